"""The ``distillery`` command. Subcommands call the same functions as ``jobs/``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("distillery")


def _refine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="append", required=True, metavar="PATH_OR_GLOB",
                   help="input file, directory or glob (JSONL[.gz|.zst], Parquet, text); repeatable")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--config", metavar="FILE", help="YAML config (see configs/refine.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config value, e.g. --set dedup.near.threshold=0.85; repeatable")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory's results (without it, an interrupted run "
                   "in DIR resumes, and anything else there is refused)")
    p.add_argument("--keep-work", action="store_true", help="keep the intermediate _work/ directory")
    p.add_argument("--address", default=None, help="Ray address to join (default: RAY_ADDRESS, else start locally)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")


def _config(cls, args: argparse.Namespace):
    """The job's config from --config and --set, or None after printing the error."""
    from app.config import ConfigError, load_config

    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def _ray_job(name: str, cls, args: argparse.Namespace, run):
    """The shape of the Ray jobs below: config from --config/--set, Ray started or joined, ``run(cfg)``.
    Returns (cfg, result, None), or (cfg, None, exit code) after printing the error: 2 for bad input, 130 for a
    sweep interrupted (run it again to resume)."""
    cfg = _config(cls, args)
    if cfg is None:
        return None, None, 2
    from app.distill.tune import SweepInterrupted
    from app.models import ModelLoadError
    from app.raystart import init_ray

    init_ray(args.address, args.num_cpus)
    try:
        return cfg, run(cfg), None
    except (FileNotFoundError, ValueError, ModelLoadError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return cfg, None, 2
    except SweepInterrupted as e:
        print(f"{name}: {e}", file=sys.stderr)
        return cfg, None, 130


def cmd_refine(args: argparse.Namespace) -> int:
    from app.config import RefineConfig

    cfg = _config(RefineConfig, args)
    if cfg is None:
        return 2
    from app.raystart import init_ray
    from app.refine.pipeline import AccountingError, default_out_line, run_refine

    from app.models import ModelLoadError
    from app.refine.toxicity import ToxicityUnavailable

    init_ray(args.address, args.num_cpus)
    try:
        report = run_refine(args.input, args.output, cfg, overwrite=args.overwrite, keep_work=args.keep_work)
    except (FileNotFoundError, FileExistsError, ValueError, ModelLoadError, ToxicityUnavailable) as e:
        print(f"refine: {e}", file=sys.stderr)
        return 2
    except AccountingError as e:
        print(f"refine: accounting failed: {e}", file=sys.stderr)
        return 3
    c = report["counts"]
    print(f"input {c['input']}  kept {c['kept']}  dropped {c['dropped']}  quarantined {c['quarantined']}  "
          f"({report['accounting']['message']})")
    for reason, n in report["drop_reasons"].items():
        print(f"  {reason:32s} {n}")
    print(default_out_line(args.output))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from app.refine.sample import build_sample_corpus

    info = build_sample_corpus(args.out, shards=args.shards, with_bad_records=not args.clean)
    print(f"sample corpus: {info['documents']} documents from {info['files_read']} files in {info['shards']} shards "
          f"-> {args.out}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from app.dashboard.server import NoReport, make_server

    try:
        server = make_server(args.outdirs, args.port)
    except NoReport as e:
        print(f"dashboard: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dashboard: cannot listen on 127.0.0.1:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"dashboard: http://{host}:{port}/  (report.json: http://{host}:{port}/api/runs)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_delta(args: argparse.Namespace) -> int:
    import json

    from app.delta.checkpoint import DeltaError
    from app.models import ModelLoadError

    try:
        if args.action == "extract":
            from app.delta.extract import RankPolicy, extract

            policy = RankPolicy(rank=args.rank, energy=args.energy, sv_epsilon=args.sv_epsilon, svd=args.svd,
                                oversample=args.oversample, power_iters=args.power_iters, max_rank=args.max_rank)
            res = extract(args.base, args.tuned, args.out, policy=policy, embeddings=args.embeddings,
                          include=args.include, exclude=args.exclude, dtype=args.dtype, resize=args.resize,
                          workers=args.workers)
            ranks = [v["rank"] for v in res.modules.values() if "rank" in v]
            print(f"adapter: {args.out}  ({len(ranks)} LoRA modules, ranks {min(ranks) if ranks else '-'}.."
                  f"{max(ranks) if ranks else '-'}, {sum(v['kind'] == 'modules_to_save' for v in res.modules.values())} "
                  f"saved in full, {len(res.skipped)} skipped; {res.seconds:.1f}s)")
        elif args.action == "transfer":
            return _delta_transfer(args)
        elif args.action == "apply":
            from app.delta.apply import apply

            out = apply(args.adapter, args.model, args.out, merge=args.merge, dtype=args.dtype)
            print(f"{'merged checkpoint' if args.merge else 'adapter'}: {out}")
        else:
            from app.delta.transfer import is_transfer_adapter, table_lines, verify_transfer
            from app.delta.verify import table, verify

            if is_transfer_adapter(args.adapter):
                report = verify_transfer(args.adapter)  # in this process: no Ray needed
                print("\n".join(table_lines(report)))
            else:
                if not (args.base and args.tuned):
                    raise DeltaError("--base and --tuned are needed for a weight-space adapter")
                report = verify(args.base, args.tuned, args.adapter, texts=args.texts, n_texts=args.num_texts,
                                max_tokens=args.max_tokens)
                print(table(report))
            if args.report:
                with open(args.report, "w") as f:
                    json.dump(report, f, indent=1)
                print(f"report: {args.report}")
    except (DeltaError, ModelLoadError, FileNotFoundError) as e:
        print(f"delta {args.action}: {e}", file=sys.stderr)
        return 2
    return 0


def _delta_transfer(args: argparse.Namespace) -> int:
    import dataclasses

    from app.delta.transfer import TransferOptions, run_transfer, table_lines
    from app.raystart import init_ray

    fields = {f.name for f in dataclasses.fields(TransferOptions)}
    opts = TransferOptions(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    init_ray(args.address, args.num_cpus)
    res = run_transfer(args.base_a, args.tuned_a, args.target, args.text or [], args.out, eval_texts=args.eval_text,
                       retain_texts=args.retain_text, cache_dir=args.cache, opts=opts)
    print("\n".join(table_lines(res.report)))
    print(f"adapter: {args.out}  (PEFT LoRA for {args.target}; report {os.path.join(args.out, 'transfer.json')}"
          f"{'; span scores from the cache' if res.cached else ''})")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from app.distill.config import DistillConfig
    from app.distill.train import distill

    _, result, code = _ray_job("distill", DistillConfig, args, distill)
    if code is not None:
        return code
    ppl = (f"  held-out perplexity: student {result['eval_student_ppl']:.2f}, teacher {result['eval_teacher_ppl']:.2f}"
           if result.get("eval_student_ppl") is not None else "")
    print(f"student: {result['student']}  ({result.get('step')} steps, {result.get('tokens')} tokens){ppl}")
    return 0


def cmd_tune_distill(args: argparse.Namespace) -> int:
    from app.distill.config import TuneDistillConfig
    from app.distill.tune import METRIC, tune_distill

    cfg, res, code = _ray_job("tune-distill", TuneDistillConfig, args, tune_distill)
    if code is not None:
        return code
    b = res["best"]
    done = sum(t["status"] == "complete" for t in res["trials"])
    stopped = sum(t["status"] == "stopped" for t in res["trials"])
    failed = sum(t["status"] == "error" for t in res["trials"])
    print(f"{len(res['trials'])} trials ({done} ran their budget, {stopped} stopped early by ASHA, {failed} failed)"
          + ("  [resumed]" if res["resumed"] else ""))
    print(f"best: {b['trial_id']}  held-out perplexity {b[METRIC]:.4g} at step {b['step']}/{res['total_steps']}  "
          + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(b["params"].items())))
    print(f"best config: {res['best_config']}   (python jobs/distill.py --config {res['best_config']})")
    print(f"Tune dashboard: tensorboard --logdir {os.path.join(os.path.abspath(cfg.output), 'tune')}")
    return 0 if not failed else 1


def _job_args(p: argparse.ArgumentParser, yaml_name: str, example: str) -> None:
    """--config, --set, --address, --num-cpus: the options of a job run from a config."""
    p.add_argument("--config", metavar="FILE", help=f"YAML config (see configs/{yaml_name})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help=f"override one config value, e.g. --set {example}; repeatable")
    p.add_argument("--address", default=None, help="Ray address to join (default: RAY_ADDRESS, else start locally)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")


def _tune_args(sub) -> None:
    p = sub.add_parser("tune-distill", help="Ray Tune (Optuna + ASHA) over distillation loss weights and stages")
    _job_args(p, "tune_distill.yaml", "num_samples=16")
    p.set_defaults(fn=cmd_tune_distill)


def cmd_scaling(args: argparse.Namespace) -> int:
    from app.scaling.analysis import summary_lines

    if args.action == "fit":
        from app.scaling.sweep import fit_file

        try:
            res = fit_file(args.runs, args.target, args.out, bootstrap=args.bootstrap, workers=args.workers,
                           top_inits=args.top_inits)
        except (FileNotFoundError, ValueError) as e:
            print(f"scaling fit: {e}", file=sys.stderr)
            return 2
    else:
        from app.scaling.sweep import ScalingSweepConfig, sweep

        _, res, code = _ray_job("scaling sweep", ScalingSweepConfig, args, sweep)
        if code is not None:
            return code
        print(f"runs: {res['runs_table']}  ({res['runs']} runs, {len(res['failed'])} failed)")
    print("\n".join(summary_lines(res)))
    if res.get("paths"):
        print(f"report: {res['paths']['html']}")
    return 0


def _scaling_args(sub) -> None:
    p = sub.add_parser("scaling", help="Chinchilla scaling: sweep (IsoFLOP grid on Ray Tune) | fit RUNS table")
    acts = p.add_subparsers(dest="action", required=True)
    s = acts.add_parser("sweep", help="train a grid of student sizes x budgets, then fit (see configs/scaling.yaml)")
    _job_args(s, "scaling.yaml", "mode=distill")
    f = acts.add_parser("fit", help="fit Approach 3 and Approach 2 to a runs table (.parquet or .csv)")
    f.add_argument("runs", metavar="RUNS", help="table with model size, tokens and/or training FLOPs, and loss")
    f.add_argument("--target", type=float, action="append", default=[],
                   help="compute budget (FLOPs) to give N*, D* for; repeatable (default: 10x the largest run)")
    f.add_argument("--out", help="write scaling.json, PNG plots and report.html here")
    f.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the intervals (0: none)")
    f.add_argument("--workers", type=int, default=None, help="processes for the fits (default: one per CPU)")
    f.add_argument("--top-inits", type=int, default=None,
                   help="start L-BFGS from the K best of the 4,500 grid points (default: all, as the paper)")
    p.set_defaults(fn=cmd_scaling)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from app.config import ConfigError, load_config
    from app.models import ModelLoadError
    from app.serve.config import ServeConfig

    sets = [f"model={args.model}"] if args.model else []
    sets += [f"port={args.port}"] if args.port is not None else []
    sets += [f"host={args.host}"] if args.host is not None else []
    sets += [f"model_name={args.served_model_name}"] if args.served_model_name else []
    if args.replicas is not None:
        sets += [f"deployment.replicas={args.replicas}", "deployment.autoscale.enabled=false"]
    if args.autoscale:
        lo, _, hi = args.autoscale.partition(":")
        if not (lo.isdigit() and hi.isdigit()):
            print(f"serve: --autoscale wants MIN:MAX replicas, got {args.autoscale!r}", file=sys.stderr)
            return 2
        sets += ["deployment.autoscale.enabled=true", f"deployment.autoscale.min_replicas={lo}",
                 f"deployment.autoscale.max_replicas={hi}"]
    try:
        cfg = load_config(ServeConfig, args.config, [*args.overrides, *sets])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from ray import serve

    from app.raystart import init_ray
    from app.serve.server import builder_api_key, check_model, start

    try:
        check_model(cfg.model)
        key = builder_api_key(cfg)  # an API beyond loopback without a key stops here, before Ray starts
    except (FileNotFoundError, ModelLoadError, ValueError) as e:  # ValueError: APIKeyRequired, an empty key file
        print(f"serve: {e}", file=sys.stderr)
        return 2
    if key is None and not cfg.api_key_file:
        print(f"serve: warning: no API key ({cfg.api_key_env or 'api_key_env'} is not set here): the API is open to "
              f"anyone who can reach {cfg.host}:{cfg.port}", file=sys.stderr)
    init_ray(args.address, args.num_cpus)
    try:
        url = start(cfg)
    except RuntimeError as e:  # a replica failed to start (its error is in the message)
        print(f"serve: the deployment failed: {' '.join(str(e).split())[:2000]}", file=sys.stderr)
        return 1
    print(f"serving {cfg.model} as '{cfg.served_name}' at {url}  (try: curl {url}/models)", flush=True)
    if args.detach:
        print("detached: the application keeps running on the cluster (serve shutdown -y to stop it)")
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop` and `kill` end it as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("serve: shutting down", file=sys.stderr)
    finally:
        serve.shutdown()
    return 0


def _serve_args(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server for a model (Ray Serve), e.g. the distilled student")
    p.add_argument("model", nargs="?", metavar="MODEL", help="save_pretrained dir, GGUF file, smollm2 or hub id "
                   "(default: the config's model)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1; any other address needs an API key: "
                   "DISTILLERY_API_KEY set where this runs, or --set api_key_file=PATH)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model "
                   "directory's name, or the hub id)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas")
    p.add_argument("--detach", action="store_true", help="deploy and exit (the app stays up on the cluster)")
    _job_args(p, "serve.yaml", "batch.max_batch_size=16")
    p.set_defaults(fn=cmd_serve)


def _distill_args(sub) -> None:
    p = sub.add_parser("distill", help="distill a teacher Transformer into a hybrid Mamba student (Ray Train)")
    _job_args(p, "distill.yaml", "train.num_workers=4")
    p.set_defaults(fn=cmd_distill)


def _transfer_args(acts) -> None:
    from app.delta.transfer import TransferOptions

    d = TransferOptions()
    t = acts.add_parser("transfer", help="a fine-tune's delta (A0 -> A1) carried onto B of another family, "
                        "in function space: a PEFT LoRA for B")
    t.add_argument("--base-a", required=True, metavar="A0", help="A's base model")
    t.add_argument("--tuned-a", required=True, metavar="A1", help="A's fine-tune")
    t.add_argument("--target", required=True, metavar="B", help="the model to carry the change onto")
    t.add_argument("--text", action="append", metavar="PATH_OR_GLOB",
                   help="transfer text (JSONL/Parquet/text, as the refine job reads); repeatable. A plain-text file "
                   "(.txt/.md/.rst/.text) is cut into documents at blank lines (paragraphs longer than "
                   "--text-doc-bytes at line ends or spaces), so a hashed share of them can be held out")
    t.add_argument("--eval-text", action="append", metavar="PATH_OR_GLOB",
                   help="held-out in-domain text for the report (default: a hashed share of --text)")
    t.add_argument("--retain-text", action="append", metavar="PATH_OR_GLOB",
                   help="general text: the retain term and the damage measure (default: text on this machine)")
    t.add_argument("--sample-from-tuned", type=int, metavar="N", help=f"add N samples of A1 (default {d.sample_from_tuned})")
    t.add_argument("--out", required=True, help="the adapter, transfer.json, placebo/ (and weight_space/)")
    t.add_argument("--cache", help="span-score cache directory (default: OUT/cache); shared by reruns")
    for name, typ in (("beta", float), ("rank", int), ("alpha", float), ("retain_weight", float), ("steps", int),
                      ("lr", float), ("batch_tokens", int), ("max_tokens", int), ("heldout", float), ("seed", int),
                      ("sample_tokens", int), ("num_gpus", float), ("concurrency", int), ("actor_cpus", float),
                      ("text_doc_bytes", int)):
        t.add_argument("--" + name.replace("_", "-"), type=typ, help=f"default {getattr(d, name)}")
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help=f"dtype of every model that scores spans (default {d.dtype}); part of the cache key")
    t.add_argument("--target-modules", type=lambda s: s if s == "all-linear" else s.split(","),
                   help=f"PEFT target modules, comma-separated (default {d.target_modules})")
    t.add_argument("--no-placebo", dest="placebo", action="store_false", default=None, help="skip the placebo fit")
    t.add_argument("--no-weight-space", dest="weight_space", action="store_false", default=None,
                   help="skip the weight-space route when A and B share shapes")
    t.add_argument("--address", default=None, help="Ray address to join (default: RAY_ADDRESS, else start locally)")
    t.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray")


def _delta_args(sub) -> None:
    p = sub.add_parser("delta", help="deltas as LoRA adapters: extract | apply | verify | transfer (across families)")
    acts = p.add_subparsers(dest="action", required=True)
    e = acts.add_parser("extract", help="tuned - base as a PEFT LoRA adapter")
    e.add_argument("--base", required=True)
    e.add_argument("--tuned", required=True)
    e.add_argument("--out", required=True)
    rank = e.add_mutually_exclusive_group(required=True)
    rank.add_argument("--rank", type=int, help="the same rank for every module")
    rank.add_argument("--energy", type=float, help="per module: smallest rank keeping this fraction of ||delta||_F^2")
    rank.add_argument("--sv-epsilon", type=float, help="per module: singular values above this")
    e.add_argument("--svd", choices=["exact", "gram", "randomized"], default="exact",
                   help="exact: LAPACK SVD; gram: eigh of the Gram matrix (optimal truncation, faster on CPU); "
                        "randomized: approximate, fastest at low rank")
    e.add_argument("--oversample", type=int, default=10)
    e.add_argument("--power-iters", type=int, default=2)
    e.add_argument("--max-rank", type=int, default=None, help="randomized + --energy/--sv-epsilon: triplets computed")
    e.add_argument("--workers", type=int, default=None,
                   help="factorizations in parallel on CPU (default: min(4, torch threads); torch threads shared out)")
    e.add_argument("--embeddings", choices=["lora", "full", "skip"], default="lora")
    e.add_argument("--include", help="regex: only modules whose name matches")
    e.add_argument("--exclude", help="regex: leave out modules whose name matches")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="adapter dtype (default: the input's)")
    e.add_argument("--resize", action="store_true", help="allow a different vocabulary size (embeddings in full)")
    a = acts.add_parser("apply", help="a LoRA adapter onto a model: merged checkpoint or adapter")
    a.add_argument("--adapter", required=True)
    a.add_argument("--model", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--merge", action="store_true", help="merge_and_unload and save an HF checkpoint")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    _transfer_args(acts)
    v = acts.add_parser("verify", help="per-module error and KL(tuned || base + adapter); for a transfer adapter, "
                        "the transfer measures recomputed")
    v.add_argument("--base", help="the base checkpoint (not needed for a transfer adapter)")
    v.add_argument("--tuned", help="the tuned checkpoint (not needed for a transfer adapter)")
    v.add_argument("--adapter", required=True)
    v.add_argument("--texts", help="text file (a text per line, or JSONL with text); default: text on this machine")
    v.add_argument("--num-texts", type=int, default=32)
    v.add_argument("--max-tokens", type=int, default=256)
    v.add_argument("--report", help="write the JSON report here")
    p.set_defaults(fn=cmd_delta)


def build_parser() -> argparse.ArgumentParser:
    """The ``distillery`` command line (the jobs/ entry points parse theirs with it too)."""
    parser = argparse.ArgumentParser(prog="distillery", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("refine", help="dedup + quality-filter a corpus (the refine job)")
    _refine_args(p)
    p.set_defaults(fn=cmd_refine)
    p = sub.add_parser("sample-corpus", help="build the sample corpus from text installed on this machine")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--clean", action="store_true", help="no malformed records")
    p.set_defaults(fn=cmd_sample)
    p = sub.add_parser("dashboard", help="serve the data-quality dashboard of refine runs on 127.0.0.1")
    p.add_argument("outdirs", nargs="+", metavar="OUTDIR", help="refine output directories (two: side by side)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    p.set_defaults(fn=cmd_dashboard)
    _delta_args(sub)
    _distill_args(sub)
    _tune_args(sub)
    _scaling_args(sub)
    _serve_args(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
