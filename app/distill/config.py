"""Typed config of ``jobs/distill.py`` (``configs/distill.yaml`` mirrors it; loaded with ``app.config.load_config``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from app.config import _check, _frac


@dataclass
class DataConfig:
    input: str = "out/refine/kept"
    """Refined Parquet (a refine run's ``kept/`` directory, a file, or a glob)."""
    text_field: str = "text"
    """Column holding the text."""
    id_field: str = "id"
    """Column holding the stable document id (the held-out split is a hash of it)."""
    seq_len: int = 256
    """Tokens per training sequence; documents are joined with EOS and packed, no padding."""
    eval_fraction: float = 0.05
    """Share of documents (by id hash) held out for evaluation."""
    max_docs: Optional[int] = None
    """Read at most this many documents (null: all)."""
    cache_dir: Optional[str] = None
    """Where the packed rows and teacher top-k caches are kept, keyed by what made them (null: OUTPUT/cache).
    Share it between runs (Tune trials) to tokenize and run the teacher once."""

    def __post_init__(self) -> None:
        _check(self.seq_len >= 8, "data.seq_len", "must be >= 8")
        _frac(self.eval_fraction, "data.eval_fraction")
        _check(self.eval_fraction < 1, "data.eval_fraction", "must be < 1")


def _attention_spec(value: Any) -> Optional[str]:
    """Why ``value`` is not a student.attention_layers spec (None: it is one)."""
    from app.distill.student import parse_attention_layers

    try:
        parse_attention_layers(value)
    except ValueError as e:
        return str(e)
    return None


@dataclass
class StudentConfig:
    arch: Literal["hybrid", "mamba2"] = "hybrid"
    """hybrid: transformers' BambaForCausalLM that inherits the teacher (its norms, MLPs, embeddings and head
    copied; attention mixers replaced by Mamba-2 ones except in ``attention_layers``); mamba2: a pure
    Mamba2ForCausalLM (norm + mixer blocks, no MLP; the scaling sweep's small random students)."""
    attention_layers: Any = "1/4"
    """hybrid: the teacher layers whose attention stays, as a fraction (0, 1/8, 1/4, 1/2, 1: evenly spaced as
    MambaInLlama places them, 1/4 of 30 layers keeps 3, 7, ..., 27) or a list of layer indices."""
    init: Literal["attention", "random"] = "attention"
    """Mixer initialisation. attention: Mamba-2 mixers from the teacher's Q/K/V/O with MambaInLlama's dt/A/D
    (app/distill/init.py); random: transformers' own mixer init. (hybrid: norms, MLPs, embeddings and head are
    copied either way; mamba2 attention also copies embeddings, norms and head.)"""
    conv_init: Literal["identity", "default"] = "identity"
    """The mixers' causal conv under init attention: identity (passes the projections on) or the layer's default."""
    hidden_size: Optional[int] = None
    """mamba2: student width (null: the teacher's; set, a shape of its own: init random, stages.align_tokens 0)."""
    num_layers: Optional[int] = None
    """mamba2: student depth (null: the teacher's; set, a shape of its own: init random, stages.align_tokens 0)."""
    num_heads: Optional[int] = None
    """mamba2: SSM heads (null: the teacher's attention heads; hybrid: always the teacher's)."""
    head_dim: Optional[int] = None
    """mamba2: SSM head size (null: expand * hidden / num_heads; hybrid: the teacher's head_dim)."""
    state_size: Optional[int] = None
    """mamba2: SSM state size N (null: the teacher's head_dim; hybrid: the teacher's head_dim)."""
    n_groups: Optional[int] = None
    """mamba2: B/C groups (null: one per head; hybrid: one per head)."""
    expand: int = 1
    """mamba2: d_inner = expand * hidden (hybrid: heads * head_dim / hidden of the teacher)."""
    conv_kernel: int = 4
    """Causal depthwise convolution width."""
    chunk_size: int = 64
    """Mamba-2 chunked-scan block length."""

    def __post_init__(self) -> None:
        why = _attention_spec(self.attention_layers)
        _check(why is None, "student.attention_layers", why or "")
        _check(self.arch == "mamba2" or not any(getattr(self, k) for k in (
            "hidden_size", "num_layers", "num_heads", "head_dim", "state_size", "n_groups")),
            "student", "hidden_size/num_layers/num_heads/head_dim/state_size/n_groups shape the mamba2 student only "
            "(the hybrid one has the teacher's shape)")
        _check(self.expand >= 1, "student.expand", "must be >= 1")
        for k in ("hidden_size", "num_layers", "num_heads", "head_dim", "state_size", "n_groups"):
            _check(getattr(self, k) is None or getattr(self, k) >= 1, f"student.{k}", "must be >= 1 or null")

    def shape(self):
        """The builder's StudentShape (app/distill/student.py)."""
        from app.distill.student import StudentShape

        return StudentShape(**{k: getattr(self, k) for k in StudentShape.__dataclass_fields__})


@dataclass
class StagesConfig:
    """Token budgets (per run, all workers together) and loss weights of the three stages, run in order."""

    align_tokens: int = 40_000
    """Stage align: teacher-forced, per layer: each Mamba-2 mixer gets the teacher's normed input to that layer
    and matches the teacher's attention output there; only mixer parameters train."""
    kd_tokens: int = 80_000
    """Stage kd: end-to-end KL(teacher || student) on logits at temperature T (+ kd_ce_weight * CE), all
    parameters."""
    ce_tokens: int = 0
    """Stage ce: next-token cross-entropy only."""
    weighting: Literal["fixed", "auto"] = "fixed"
    """How a stage's loss terms are combined. fixed: the weights below; auto: learned uncertainty weights
    (Kendall et al. 2018), sum_i exp(-s_i) L_i + s_i over the stage's terms (align: one per mixer; kd: KD and
    CE). Each s_i starts at the log of its term on the stage's first batch (weights 1 / L_i) and trains with the
    student at ``auto_lr``. The fixed weights are then unused."""
    auto_lr: float = 0.02
    """weighting auto: the constant learning rate of the log-variances s_i (AdamW moves each by about this much a
    step, so they follow losses that change by a few percent a step)."""
    align_weight: float = 1.0
    """Weight of the alignment loss in stage align (fixed weighting)."""
    kd_weight: float = 1.0
    """Weight of the KD loss in stage kd (fixed weighting)."""
    kd_ce_weight: float = 1.0
    """alpha: weight of CE in stage kd (fixed weighting). 1.0 was the best of 0, 0.2, 1.0 and auto weighting in
    ``benchmarks/distill_quality.py`` (hybrid 1/4, 24k tokens: held-out ppl 135.6, 116.7, 102.5; auto 118.7)."""
    temperature: float = 2.0
    """KD temperature T (the KD loss is multiplied by T^2)."""
    align_lr: Optional[float] = 3e-3
    """Peak learning rate of stage align (its own warmup and cosine over its steps; null: train.lr). Stages kd
    and ce follow train.lr over the remaining steps."""

    def __post_init__(self) -> None:
        for k in ("align_tokens", "kd_tokens", "ce_tokens"):
            _check(getattr(self, k) >= 0, f"stages.{k}", "must be >= 0")
        _check(self.align_tokens + self.kd_tokens + self.ce_tokens > 0, "stages", "all token budgets are 0")
        _check(self.temperature > 0, "stages.temperature", "must be > 0")
        for k in ("align_weight", "kd_weight", "kd_ce_weight"):
            _check(getattr(self, k) >= 0, f"stages.{k}", "must be >= 0")
        _check(self.align_lr is None or self.align_lr > 0, "stages.align_lr", "must be > 0 or null")
        _check(self.auto_lr > 0, "stages.auto_lr", "must be > 0")


@dataclass
class TrainConfig:
    num_workers: int = 2
    """Ray Train workers (data-parallel replicas)."""
    use_gpu: bool = False
    """One GPU per worker; the teacher runs in bf16 there (train.teacher_dtype: auto)."""
    teacher_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """The frozen teacher's dtype. auto: bfloat16 on GPUs, float32 on CPUs; bfloat16 on CPU runs the GPU path's
    dtype there (the tests do, so dtype mismatches show without a GPU). Its logits are computed in fp32 either way
    (app/distill/teacher.py)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism: DDP, or FSDP on GPUs (shards the student's parameters and optimizer state; stage
    align needs DDP, since it calls each layer on its own). With one worker nothing is wrapped, either way."""
    batch_size: int = 4
    """Sequences per worker per step (the job estimates each worker's memory first and refuses a batch that
    does not fit; see app/distill/memory.py)."""
    lr: float = 3e-4
    """Peak AdamW learning rate of stages kd and ce (linear warmup, cosine decay to 10%)."""
    warmup_steps: int = 10
    """Linear warmup steps (of each learning-rate segment: stage align, then stages kd + ce)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this (0: off)."""
    kd_chunk_tokens: int = 1024
    """Tokens per chunk of the KD/CE loss (bounds logits memory to chunk x vocab)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (and the last step)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run's storage."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: at the end only)."""
    eval_batches: int = 8
    """Held-out batches (of train.batch_size rows) per evaluation, all workers together."""
    seed: int = 0
    """Student initialisation and data order."""
    memory_check: bool = True
    """Before starting, estimate each worker's memory (teacher, student, optimizer state, activations of the
    chosen path) and refuse a run that does not fit its node, naming what to lower (app/distill/memory.py)."""
    eval_teacher: bool = True
    """Also report the teacher's held-out perplexity (off: runs that need no teacher, e.g. stage ce only
    or kd from the top-k cache, never load it)."""
    debug_fail_at_step: Optional[int] = None
    """Crash drill: once at this step (a marker file makes it once per output directory), the rank-0 worker fails."""
    debug_fail_mode: Literal["kill", "raise"] = "kill"
    """How the drill fails: `kill` SIGKILLs the worker's process (a crashed worker: no cleanup, its actor dies),
    5 s after the step starts, so that Ray Train has registered the last checkpoint (a worker lost within a
    poll interval, 2 s, of a checkpoint falls back to the one before); `raise` raises in the training loop."""

    def __post_init__(self) -> None:
        for k in ("num_workers", "batch_size", "kd_chunk_tokens", "checkpoint_every", "keep_checkpoints", "eval_batches"):
            _check(getattr(self, k) >= 1, f"train.{k}", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        for k in ("warmup_steps", "max_failures", "eval_every"):
            _check(getattr(self, k) >= 0, f"train.{k}", "must be >= 0")
        # one worker is never wrapped (Ray Train's prepare_model shards across workers only): fsdp runs there as is
        _check(self.strategy == "ddp" or self.use_gpu or self.num_workers == 1, "train.strategy",
               "fsdp needs train.use_gpu: true (Ray Train's FSDP runs on GPUs only)")

    def teacher_torch_dtype(self):
        """The teacher's torch dtype (see teacher_dtype)."""
        import torch

        if self.teacher_dtype == "auto":
            return torch.bfloat16 if self.use_gpu else torch.float32
        return getattr(torch, self.teacher_dtype)


@dataclass
class CacheConfig:
    teacher_topk: Optional[int] = None
    """Cache the teacher's top-k logits per training token in Parquet once (reused by later runs and Tune
    trials with the same teacher, data and k); stage kd then reads them instead of running the teacher.
    null: the teacher runs live in every step."""

    def __post_init__(self) -> None:
        _check(self.teacher_topk is None or self.teacher_topk >= 1, "cache.teacher_topk", "must be >= 1 or null")


@dataclass
class DistillConfig:
    teacher: str = "smollm2"
    """Teacher causal LM: hub id, local HF directory, GGUF file or ``smollm2`` (app/models.py)."""
    output: str = "out/distill"
    """Run directory: packed data, checkpoints, TensorBoard logs, metrics.jsonl, the exported student."""
    data: DataConfig = field(default_factory=DataConfig)
    """The refined corpus and packing."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student: hybrid or mamba2, its attention layers, shape and initialisation."""
    stages: StagesConfig = field(default_factory=StagesConfig)
    """Stage budgets and loss weights."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Ray Train and the optimiser."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """Cached teacher logits."""

    def __post_init__(self) -> None:
        sc = self.student
        if sc.arch == "mamba2" and (sc.hidden_size or sc.num_layers):
            # a width or depth of its own: no teacher layer to align each mixer with, no weights to copy (prepare()
            # checks the same against the teacher's config, for values set equal to the teacher's)
            _check(self.stages.align_tokens == 0, "stages.align_tokens",
                   "must be 0 for a mamba2 student with its own student.hidden_size/num_layers (stage align matches "
                   "each mixer to the teacher's layer of the same index and width; leave both null for the teacher's)")
            _check(sc.init == "random", "student.init",
                   "must be random for a mamba2 student with its own student.hidden_size/num_layers (init attention "
                   "copies the teacher's weights, which need its width and depth; leave both null for the teacher's)")


@dataclass
class Range:
    """A searched number: uniform in [low, high], or log-uniform with ``log: true``."""

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        _check(self.low <= self.high, "range", f"low ({self.low}) must be <= high ({self.high})")
        _check(not self.log or self.low > 0, "range", "a log range needs low > 0")


@dataclass
class SpaceConfig:
    """What Tune searches; a null entry keeps the base config's value."""

    temperature: Optional[Range] = field(default_factory=lambda: Range(1.0, 4.0))
    """KD temperature T (stages.temperature)."""
    kd_ce_weight: Optional[Range] = field(default_factory=lambda: Range(0.0, 2.0))
    """alpha: CE weight in stage kd, against KD at weight 1 (stages.kd_ce_weight)."""
    align_weight: Optional[Range] = field(default_factory=lambda: Range(0.1, 10.0, log=True))
    """Weight of the alignment loss (stages.align_weight; matters where align_share > 0)."""
    align_share: Optional[Range] = field(default_factory=lambda: Range(0.0, 0.25))
    """Share of the token budget (the base's align + kd + ce tokens) spent in stage align."""
    ce_share: Optional[Range] = field(default_factory=lambda: Range(0.0, 0.25))
    """Share spent in stage ce (the rest goes to stage kd)."""
    lr: Optional[Range] = field(default_factory=lambda: Range(3e-4, 1e-2, log=True))
    """Peak learning rate (train.lr)."""
    init: Optional[list[str]] = None
    """Student initialisations to choose from, e.g. [attention, random] (null: the base's)."""
    attention_layers: Optional[list[Any]] = None
    """Hybrid students to choose from by the attention layers they keep, e.g. ["1/8", "1/4", "1/2"] (null: the
    base's student.attention_layers)."""

    def __post_init__(self) -> None:
        for k in ("align_share", "ce_share"):
            r = getattr(self, k)
            _check(r is None or (0 <= r.low and r.high <= 1), f"space.{k}", "must lie in [0, 1]")
        _check(self.init is None or (self.init and set(self.init) <= {"attention", "random"}), "space.init",
               "must list attention and/or random")
        _check(self.attention_layers is None or bool(self.attention_layers), "space.attention_layers",
               "must list at least one choice or be null")
        for i, v in enumerate(self.attention_layers or []):
            why = "a choice must be a fraction (a list of layers cannot be searched)" if isinstance(v, list) else \
                _attention_spec(v)
            _check(why is None, f"space.attention_layers[{i}]", why or "")


@dataclass
class AshaConfig:
    enabled: bool = True
    """Stop trials early with ASHA (asynchronous successive halving); off: every trial runs its budget."""
    grace_period: int = 1
    """Reports (of report_every steps) every trial gets before it can be stopped."""
    reduction_factor: float = 2.0
    """Keep the best 1/reduction_factor of the trials at each rung."""

    def __post_init__(self) -> None:
        _check(self.grace_period >= 1, "asha.grace_period", "must be >= 1")
        _check(self.reduction_factor > 1, "asha.reduction_factor", "must be > 1")


@dataclass
class TuneDistillConfig:
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The base distillation: each trial is it with the searched values (its token budget is split among the
    stages by align_share and ce_share). Its output is ignored: trials write under OUTPUT/trials/."""
    output: str = "out/tune_distill"
    """Sweep directory: tune/ (Ray Tune's results and TensorBoard logs), trials/, best.yaml, trials.csv."""
    num_samples: int = 8
    """Trials (Optuna proposes each from the finished ones)."""
    max_concurrent_trials: Optional[int] = None
    """Trials at once (null: as many as the cluster's CPUs, or GPUs, fit at train.num_workers each)."""
    report_every: int = 4
    """Steps between held-out evaluations reported to Tune (and checkpoints); ASHA decides at these."""
    seed: int = 0
    """Optuna's sampler seed."""
    space: SpaceConfig = field(default_factory=SpaceConfig)
    """The search space."""
    asha: AshaConfig = field(default_factory=AshaConfig)
    """Early stopping."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "num_samples", "must be >= 1")
        _check(self.report_every >= 1, "report_every", "must be >= 1")
        _check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1, "max_concurrent_trials",
               "must be >= 1 or null")
