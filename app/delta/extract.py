"""``delta extract``: the weight difference of two checkpoints as a PEFT LoRA adapter.

Per parameter of the tuned checkpoint (streamed one base/tuned pair at a time), delta = tuned - base in fp32:

    Linear / Conv1D weight   truncated SVD of the delta as (out, in) (Conv1D stores (in, out): transposed
                             first, and the adapter says ``fan_in_fan_out``): B = U_k sqrt(S_k),
                             A = sqrt(S_k) V_k^T, ``lora_alpha`` = rank per module, so PEFT's scaling is 1
                             and B @ A is the delta itself
    Linear / Conv1D bias     ``lora_B.bias`` (``lora_bias: true``; PEFT's switch is global, so every target
                             gets one, zero where the bias did not change)
    Embedding weight         ``--embeddings lora``: PEFT embedding LoRA (lora_embedding_A/B, same SVD of the
                             delta transposed); ``full``: the tuned embedding in ``modules_to_save``; ``skip``
    anything else (norms)    the tuned module in ``modules_to_save``

Rank per module: ``rank`` (fixed), ``energy`` (smallest k whose singular values keep that fraction of the
delta's squared Frobenius norm) or ``sv_epsilon`` (singular values above it); recorded in
``rank_pattern``/``alpha_pattern``. SVD, in fp32, on CUDA when present:
    exact        torch.linalg.svd (LAPACK gesdd): every triplet to full fp32 accuracy
    gram         the eigendecomposition of the Gram matrix X X^T on the delta's smaller side (X: the delta or
                 its transpose): U_k = the top-k eigenvectors, S_k V_k^T = U_k^T X. B @ A is then the
                 orthogonal projection of X onto span(U_k), so its error is the optimal (Eckart-Young) one
                 up to fp32 rounding of U_k; 2-4x faster than gesdd on CPU. Singular values far below the
                 largest (sigma < ~1e-3 sigma_1) carry the rounding of the squared spectrum: thresholds
                 there (--sv-epsilon) want ``exact``
    randomized   torch.svd_lowrank with oversampling and power iterations (approximate, fastest at low rank) Parameters
that did not change are left out. Tied input/output embeddings that changed travel in full (both
modules, one tuned weight): PEFT cannot merge a LoRA on tied weights exactly once. Randomized SVD falls
back to the exact one where k + oversample reaches a quarter of the smaller side (no cheaper there).
A different vocabulary size is an error unless ``resize``: then the tuned embedding (and an untied output layer) travel in full and ``distillery_delta.json`` records the size
the target model is resized to before the adapter is applied.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from app.delta.checkpoint import Checkpoint, DeltaError, iter_param_keys, module_kinds

log = logging.getLogger(__name__)

META_FILE = "distillery_delta.json"


@dataclass
class RankPolicy:
    rank: Optional[int] = None
    energy: Optional[float] = None
    sv_epsilon: Optional[float] = None
    svd: str = "exact"
    oversample: int = 10
    power_iters: int = 2
    max_rank: Optional[int] = None  # randomized + energy/epsilon: the most singular triplets computed

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.rank, self.energy, self.sv_epsilon)]
        if sum(given) != 1:
            raise DeltaError("give exactly one of --rank, --energy, --sv-epsilon")
        if self.rank is not None and self.rank < 1:
            raise DeltaError("--rank must be >= 1")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise DeltaError("--energy must be in (0, 1]")
        if self.svd not in ("exact", "gram", "randomized"):
            raise DeltaError("--svd must be exact, gram or randomized")


def pick_rank(s, total: float, policy: RankPolicy) -> int:
    """k from singular values ``s`` (descending) of a matrix whose squared Frobenius norm is ``total``."""
    import torch

    if policy.rank is not None:
        return min(policy.rank, len(s))
    if policy.sv_epsilon is not None:
        return int((s > policy.sv_epsilon).sum())
    kept = torch.cumsum(s.double() ** 2, 0) / total
    reach = torch.nonzero(kept >= policy.energy * (1 - 1e-12))
    return int(reach[0]) + 1 if len(reach) else len(s) + 1  # len+1: not reached with these values


def gram_eigh(m):
    """(s, Q, X, wide): eigh of the Gram matrix on m's smaller side, descending. X = m if wide else m^T."""
    import torch

    wide = m.shape[0] <= m.shape[1]
    x = m if wide else m.T  # (r, c), r <= c
    lam, q = torch.linalg.eigh(x @ x.T)  # (r,), (r, r) ascending
    return lam.flip(0).clamp_min(0).sqrt(), q.flip(1), x, wide


def gram_take(q, x, wide: bool, k: int):
    """(U_k, S_k, V_k) of m from gram_eigh's Q and X: S_k V_k^T = Q_k^T X."""
    import torch

    qk = q[:, :k]  # (r, k)
    y = qk.T @ x  # (k, c) = S_k V_k^T
    s = torch.linalg.vector_norm(y, dim=1)  # (k,)
    v = (y / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]).T  # (c, k); a zero row stays zero
    return (qk, s, v) if wide else (v, s, qk)


def svd_topk(m, k: int, policy: RankPolicy):
    """(U_k, S_k, V_k) of m, exact, from the Gram matrix, or randomized."""
    import torch

    if policy.svd == "gram":
        _, q, x, wide = gram_eigh(m)
        return gram_take(q, x, wide, k)
    q = k + policy.oversample
    if policy.svd == "randomized" and 4 * q < min(m.shape):  # else the exact SVD is as cheap, and exact
        u, s, v = torch.svd_lowrank(m, q=q, niter=policy.power_iters)
        return u[:, :k], s[:k], v[:, :k]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vh[:k].T


def factorize(m, policy: RankPolicy):
    """B (out, k), A (k, in) with B @ A ~ m (fp32); plus k and the energy fraction kept."""
    import torch

    total = float(torch.linalg.vector_norm(m, dtype=torch.float64)) ** 2
    if total == 0:
        return None
    full = min(m.shape)
    if policy.rank is not None:
        k = min(policy.rank, full)
        u, s, v = svd_topk(m, k, policy)
    elif policy.svd == "randomized":
        cap = min(policy.max_rank or 256, full)
        u, s, v = svd_topk(m, cap, policy)
        k = pick_rank(s, total, policy)
        if k > len(s):  # the threshold needs more than was computed: do it exactly
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            v = vh.T
            k = pick_rank(s, total, policy)
        u, s, v = u[:, :k], s[:k], v[:, :k]
    elif policy.svd == "gram":  # the whole spectrum from the eigenvalues, factors for the top k only
        s_all, q, x, wide = gram_eigh(m)
        k = min(pick_rank(s_all, float((s_all.double() ** 2).sum()), policy), full)
        u, s, v = gram_take(q, x, wide, k)
    else:  # exact: the energy of the full spectrum as computed (fp32 singular values), not of m in float64
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        k = min(pick_rank(s, float((s.double() ** 2).sum()), policy), full)
        u, s, v = u[:, :k], s[:k], vh[:k].T
    if k == 0:
        return None
    root = s.sqrt()
    b = u * root
    a = (v * root).T
    energy = float((s.double() ** 2).sum()) / total
    # ||m - U_k S_k V_k^T||^2 = ||m||^2 - sum S_k^2 for all three methods (U_k, V_k orthonormal; randomized:
    # U_k = Q U_B with Q orthonormal). The difference loses digits when the error is small: then compute it.
    err = math.sqrt(1 - energy) if energy < 0.99 else float(torch.linalg.matrix_norm(m - b @ a)) / math.sqrt(total)
    return b.contiguous(), a.contiguous(), k, energy, err


@dataclass
class ExtractResult:
    out: str
    modules: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0


def _match(name: str, include: Optional[str], exclude: Optional[str]) -> bool:
    return (include is None or re.search(include, name) is not None) and (exclude is None or re.search(exclude, name) is None)


class _Workers:
    """Factorizations on a few threads, torch's intra-op threads shared out among them (restored on exit).

    LAPACK's eigh/gesdd use extra threads poorly at these sizes: on 2 cores, two workers of one thread each
    factor SmolLM2-135M's deltas faster than one worker of two threads, and reading the next tensors
    overlaps the SVDs. On CUDA (or with one worker) the work runs inline.
    """

    def __init__(self, workers: Optional[int], device: str):
        import torch

        self._threads = torch.get_num_threads()
        self.workers = max(1, workers or (1 if device != "cpu" else min(4, self._threads)))
        self._pool = None

    def __enter__(self) -> "_Workers":
        import torch

        if self.workers > 1:
            torch.set_num_threads(max(1, self._threads // self.workers))
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="delta-svd")
        return self

    def submit(self, fn, *args) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        done: Future = Future()
        done.set_result(fn(*args))
        return done

    def __exit__(self, *exc) -> None:
        import torch

        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(self._threads)


def extract(base: str, tuned: str, out: str, *, policy: RankPolicy, embeddings: str = "lora",
            include: Optional[str] = None, exclude: Optional[str] = None, dtype: Optional[str] = None,
            resize: bool = False, device: Optional[str] = None, workers: Optional[int] = None) -> ExtractResult:
    import torch
    from safetensors.torch import save_file

    if embeddings not in ("lora", "full", "skip"):
        raise DeltaError("--embeddings must be lora, full or skip")
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    b_ck, t_ck = Checkpoint(base), Checkpoint(tuned)
    if b_ck.model_type != t_ck.model_type:
        raise DeltaError(f"different architectures: base is {b_ck.model_type}, tuned is {t_ck.model_type}")
    kinds, params, tied = module_kinds(t_ck)
    tied_out = {o for _, o in tied}
    res = ExtractResult(out=out)
    tensors: dict = {}
    lora_mods: dict[str, dict] = {}  # module -> {"kind", "rank", "bias": tensor|None, "dtype"}
    save_mods: set[str] = set()
    embed_lora: set[str] = set()
    resize_to = None
    out_dtype = getattr(torch, dtype) if dtype else None

    def put(key, value, like):  # like: the tuned tensor or its dtype (the output dtype unless --dtype)
        tensors[key] = value.to(out_dtype or getattr(like, "dtype", like)).contiguous().cpu()

    def finish(job) -> None:  # a factorization's result into the adapter
        key, mod, kind, like, future = job
        f = future.result()
        if f is None:
            res.skipped[key] = "no singular value above the threshold"
            return
        b, a, k, energy, err = f
        if kind == "embedding":
            embed_lora.add(mod)
            lora_mods[mod] = {"kind": "embedding", "rank": k, "energy": energy, "rel_error": err}
            put(f"base_model.model.{mod}.lora_embedding_A", a, like)
            put(f"base_model.model.{mod}.lora_embedding_B", b, like)
        else:
            lora_mods.setdefault(mod, {"kind": kind})
            lora_mods[mod].update(rank=k, like=like, energy=energy, rel_error=err)  # dtype only: hold no tensor
            put(f"base_model.model.{mod}.lora_A.weight", a, like)
            put(f"base_model.model.{mod}.lora_B.weight", b, like)

    pending: deque = deque()
    with _Workers(workers, device) as pool:
        for key, mod, pname in iter_param_keys(t_ck, params):
            kind = kinds[mod]
            if not _match(mod, include, exclude):
                res.skipped[key] = "excluded by --include/--exclude"
                continue
            if mod in tied_out and key not in b_ck:
                continue  # the tied output layer: adapted through the input embedding
            if key not in b_ck:
                raise DeltaError(f"{key} is in the tuned checkpoint but not in the base")
            tb, tt = b_ck.get(key), t_ck.get(key)
            if tb.shape != tt.shape:
                vocab_rows = kind == "embedding" or mod in tied_out or mod == "lm_head"
                if vocab_rows and tb.shape[1:] == tt.shape[1:]:
                    if not resize:
                        raise DeltaError(f"vocabulary size differs: {key} has {tb.shape[0]} rows in the base and "
                                         f"{tt.shape[0]} in the tuned checkpoint; pass --resize to carry the tuned "
                                         "embedding in full and resize the target model when applying")
                    resize_to = tt.shape[0]
                    save_mods.add(mod)
                    continue
                raise DeltaError(f"{key}: shape {tuple(tb.shape)} in the base, {tuple(tt.shape)} in the tuned checkpoint")
            delta = tt.to(device, torch.float32) - tb.to(device, torch.float32)
            like = tt.dtype
            del tb, tt
            if not bool(delta.any()):
                continue
            if kind in ("linear", "conv1d") and pname == "weight":
                m = delta.T if kind == "conv1d" else delta
                pending.append((key, mod, kind, like, pool.submit(factorize, m, policy)))
            elif kind in ("linear", "conv1d") and pname == "bias":
                lora_mods.setdefault(mod, {"kind": kind})["bias"] = (delta.cpu(), like)
            elif kind == "embedding" and embeddings == "skip":
                res.skipped[key] = "--embeddings skip"
            elif kind == "embedding" and embeddings == "lora":
                # PEFT: delta = (lora_embedding_B @ lora_embedding_A).T
                pending.append((key, mod, "embedding", like, pool.submit(factorize, delta.T, policy)))
            else:
                save_mods.add(mod)
            del delta
            while len(pending) > 2 * pool.workers:  # bounded: at most that many deltas in memory
                finish(pending.popleft())
        while pending:
            finish(pending.popleft())

    # biases: a module whose bias changed but whose weight did not still needs LoRA factors (zero, rank 1)
    any_bias = any("bias" in v for v in lora_mods.values())
    if any_bias and embed_lora:  # PEFT: lora_bias=True is not supported for embedding LoRA
        for mod in sorted(embed_lora):
            log.warning("%s: saved in full (modules_to_save): PEFT's lora_bias, needed for the bias deltas, "
                        "does not support embedding LoRA", mod)
            res.skipped[f"{mod}.weight"] = "embedding LoRA impossible with lora_bias: saved in full instead"
            del lora_mods[mod], tensors[f"base_model.model.{mod}.lora_embedding_A"], tensors[f"base_model.model.{mod}.lora_embedding_B"]
            save_mods.add(mod)
        embed_lora.clear()
    for mod, v in list(lora_mods.items()):
        if v["kind"] == "embedding":
            continue
        if "rank" not in v:
            delta, like = v["bias"]
            n_out, n_in = (delta.shape[0], _in_features(t_ck, mod, v["kind"]))
            put(f"base_model.model.{mod}.lora_A.weight", delta.new_zeros(1, n_in), like)
            put(f"base_model.model.{mod}.lora_B.weight", delta.new_zeros(n_out, 1), like)
            v.update(rank=1, energy=1.0, rel_error=0.0, like=like)
        if any_bias:
            n_out = tensors[f"base_model.model.{mod}.lora_B.weight"].shape[0]
            bias = v["bias"][0] if "bias" in v else tensors[f"base_model.model.{mod}.lora_B.weight"].new_zeros(n_out)
            put(f"base_model.model.{mod}.lora_B.bias", bias, v["like"] if "like" in v else v["bias"][1])
    # Tied input/output embeddings travel in full, both modules with the same tuned weight. PEFT 0.21's
    # LoRA on a tied embedding either misses the output layer (unmerged) or, with ensure_weight_tying,
    # applies the delta twice to the shared weight when merged (seen in tests/test_delta.py's round trip).
    alias: dict[str, str] = {}
    for inp, outm in tied:
        if inp not in save_mods and inp not in embed_lora:
            continue
        if inp in embed_lora:
            res.skipped[f"{inp}.weight"] = "tied embedding: saved in full with its tied output layer (PEFT cannot merge a LoRA on tied weights once)"
            del lora_mods[inp], tensors[f"base_model.model.{inp}.lora_embedding_A"], tensors[f"base_model.model.{inp}.lora_embedding_B"]
            embed_lora.discard(inp)
            save_mods.add(inp)
        save_mods.add(outm)
        alias[f"{outm}.weight"] = f"{inp}.weight"
    for mod in save_mods:
        for p in params[mod]:
            key = f"{mod}.{p}"
            src = key if key in t_ck else alias.get(key)
            if src is not None:
                t = t_ck.get(src) if src == key else t_ck.get(src).clone()  # an alias: its own copy (safetensors)
                put(f"base_model.model.{key}", t, t)
    if not lora_mods and not save_mods:
        raise DeltaError("the two checkpoints do not differ (in the selected modules): nothing to extract")

    targets = sorted(lora_mods)
    ranks = {m: lora_mods[m]["rank"] for m in targets}
    r = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 8
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    # adapter_config.json in PEFT's LoraConfig format, written directly: importing peft costs ~3 s, most of
    # a whole extraction of a small model (tests load every adapter with PeftModel.from_pretrained)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
           "r": r, "lora_alpha": r, "target_modules": targets or None, "rank_pattern": pattern,
           "alpha_pattern": dict(pattern), "modules_to_save": sorted(save_mods) or None, "lora_bias": any_bias,
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": any(v["kind"] == "conv1d" for v in lora_mods.values()),
           "init_lora_weights": False, "use_rslora": False, "use_dora": False}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    res.modules = {m: {k: v for k, v in lora_mods[m].items() if k in ("kind", "rank", "energy", "rel_error")} for m in targets}
    res.modules.update({m: {"kind": "modules_to_save"} for m in sorted(save_mods)})
    res.seconds = time.perf_counter() - t0
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump({"base": base, "tuned": tuned, "resize_vocab": resize_to, "streamed": b_ck.streamed and t_ck.streamed,
                   "policy": policy.__dict__, "embeddings": embeddings, "modules": res.modules, "skipped": res.skipped,
                   "seconds": res.seconds}, f, indent=1)
    return res


def _in_features(ckpt: Checkpoint, mod: str, kind: str) -> int:
    shape = ckpt.shape(f"{mod}.weight")
    return shape[0] if kind == "conv1d" else shape[1]
