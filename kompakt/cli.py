"""The `kompakt` console script: one subcommand per stage.

    kompakt prepare RECIPE [key.sub=value ...]     clean the corpus (data_prep)
    kompakt tokenizer RECIPE [...]                 train a tokenizer and write packed token shards
    kompakt pretrain RECIPE [...] [--dry-run]      pretrain with DeepSpeed (CPU, GPU, many nodes)
    kompakt export CHECKPOINT_DIR [--out DIR]      a training checkpoint as a Hugging Face folder
    kompakt run RECIPE [...]                       every stage the recipe has, in order
    kompakt validate RECIPE [...]                  check a recipe and print it resolved
    kompakt bench data|model|mfu|train|infer|batch|serve [--json]  benchmarks, with ratios against a baseline
    kompakt slurm submit RECIPE --stage STAGE ...  render the stage's sbatch jobs and submit them
    kompakt slurm status RUN                       a run's jobs and which of its stages are complete
    kompakt infer MODEL INPUTS... --out DIR        batch inference over a corpus into Parquet shards
    kompakt serve MODEL [--port P]                 an HTTP JSON API with dynamic batching
    kompakt explain MODEL TEXT... --out DIR        word attributions (SHAP, integrated gradients) in text order

A user's mistake (missing file, bad UTF-8, unknown key) ends with one line on stderr and exit
status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from kompakt.errors import KompaktError

# No hub look-ups: without these a lookup retries for about 50 s before failing offline.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCHES = {
    "data": "pre-tokenisation MB/s against raw tokenizer.encode_batch, and dedup documents/s",
    "model": "packed MLM training tokens/s against stock BertForMaskedLM, padded and concatenated",
    "mfu": "CUDA GPU only: model FLOPs utilisation of BERT-base training (sequence 512, bf16, AdamW), packed "
           "against stock BertForMaskedLM on padded documents and concatenated rows, and GPU memory peaks",
    "train": "end-to-end pretraining tokens/s (loader + DeepSpeed + optimizer) against the HF Trainer, "
             "line-by-line and concatenated",
    "families": "held-out MLM loss at equal training time: the recipe's model (the demo's ALBERT), a post-LN BERT "
                "and a ModernBERT of about its parameter count, each trained by kompakt's loop",
    "infer": "CPU latency and throughput of teacher and students in PyTorch fp32/int8 and ONNX Runtime "
             "fp32/int8, against the teacher in PyTorch fp32 (TinyBERT's 12x768 and 4x312 shapes too)",
    "batch": "rows/s of kompakt infer (torch, ONNX fp32/int8) against transformers.pipeline(batch_size=32) on the "
             "same classifier and texts, and tokenisation throughput",
    "serve": "requests/s and p50/p99 latency of kompakt serve at 1, 8 and 64 concurrent clients, dynamic "
             "batching against one request per forward pass",
}


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/demo-nb.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides parsed as YAML scalars, e.g. data.min_chars=20")
    p.add_argument("--force", action="store_true", help="redo the stage even if its output is complete")


def build_parser() -> argparse.ArgumentParser:
    from kompakt.pipeline import STAGES

    parser = argparse.ArgumentParser(
        prog="kompakt",
        description="Pretrain compact, language-specific encoder models: corpus cleaning, tokenizers, "
                    "packed pretraining, compression and evaluation. Every stage writes "
                    "<run_dir>/<stage>-<hash>/ with a manifest.json; complete stages are skipped.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for stage in STAGES.values():  # one command per declared stage
        p = sub.add_parser(stage.name, help=stage.help, description=stage.description or stage.help)
        _add_recipe_args(p)
        if stage.name == "pretrain":
            p.add_argument("--dry-run", action="store_true",
                           help="print parameters, tokens per step, accumulation steps and FLOPs per token; train nothing")
            p.add_argument("--world-size", type=int, default=None,
                           help="with --dry-run: processes to plan for (default: the launcher's, else 1)")
    p = sub.add_parser("export", help="export a training checkpoint as a Hugging Face folder",
                       description="Writes config.json, model.safetensors, the tokenizer and a model card from a "
                                   "complete checkpoints/step-* directory.")
    p.add_argument("checkpoint", help="a pretrain-*/checkpoints/step-* directory")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>-hf)")
    p = sub.add_parser("run", help="run every stage of the recipe in order",
                       description="Runs each stage whose section the recipe has, skipping complete ones.")
    _add_recipe_args(p)
    p = sub.add_parser("validate", help="validate a recipe and print it resolved")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")

    p = sub.add_parser("bench", help="benchmarks with ratios against a baseline measured in the same run",
                       description="Benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHES.items()))
    p.add_argument("what", nargs="?", choices=sorted(BENCHES), default=None,
                   help="one benchmark; without it, every one in turn into <run_dir>/bench.json and one table")
    p.add_argument("--out", default=None, help="all benchmarks: where bench.json goes (default: the recipe's run_dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--recipe", default="recipes/demo-nb.yaml", help="recipe whose corpus and sizes to use")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    p.add_argument("--family", default="bert", choices=("bert", "modernbert"),
                   help="model, train: the family to compare with its stock transformers class (train: "
                        "bert means the recipe's own model; modernbert trains its sizes as a ModernBERT)")
    p.add_argument("--peak-flops", type=float, default=None, metavar="FLOP/S",
                   help="mfu: the device's peak FLOP/s (default: the GPU's bf16 data-sheet figure); given, mfu "
                        "also runs on CPU, as a check of its arithmetic (with --quick), not a measurement")

    p = sub.add_parser("slurm", help="submit stages as Slurm jobs and follow them",
                       description="Renders slurm/templates with a cluster profile (slurm/clusters/*.env) and submits "
                                   "them with sbatch, chained with --dependency=afterok.")
    slurm_sub = p.add_subparsers(dest="slurm_command", metavar="ACTION", required=True)
    s = slurm_sub.add_parser("submit", help="render and sbatch a stage (with its incomplete upstream) or all",
                             description="Submits the stage and any upstream stage that is not complete (or every "
                                         "incomplete stage with --stage all), each as its own job waiting for the "
                                         "ones it reads. Stages already queued are not submitted twice.")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides, passed to every job")
    s.add_argument("--stage", required=True, help="a stage (prepare, tokenizer, pretrain, ...) or all")
    s.add_argument("--nodes", type=int, default=1, help="nodes for the training stages (pretrain, compress)")
    s.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; training runs one process per GPU")
    s.add_argument("--procs-per-node", type=int, default=None, help="training processes per node without GPUs")
    s.add_argument("--profile", default="local", help="cluster profile: a name in slurm/clusters/ or a .env file")
    s.add_argument("--launcher", choices=("srun", "torchrun"), default=None, help="default: the profile's (srun)")
    s.add_argument("--time", default=None, help="time limit of every job, e.g. 2-00:00:00 (default: the profile's)")
    s.add_argument("--account", default=None, help="project account (default: $KOMPAKT_SLURM_ACCOUNT, the profile's)")
    s.add_argument("--partition", default=None, help="partition of every job (default: the profile's)")
    s.add_argument("--finetune-tasks", type=int, default=1, help="fine-tuning as an array of this many shards")
    s.add_argument("--warn-seconds", type=int, default=None,
                   help="training saves this long before the time limit (--signal=B:USR1@N; default: the profile's)")
    s.add_argument("--max-requeues", type=int, default=None, help="requeues after which a job stops requeueing itself")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG", help="one more sbatch directive")
    s.add_argument("--dry-run", action="store_true", help="print the scripts and their dependencies; submit nothing")
    s = slurm_sub.add_parser("status", help="a run's jobs and which stages are complete")
    s.add_argument("run", help="the recipe (with its overrides) or its run directory")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    _add_use_commands(sub)
    return parser


def _add_use_commands(sub) -> None:
    """infer, serve and explain: a released model put to use (the kompakt.infer package)."""
    from kompakt.infer.runtime import POOLINGS, RUNTIMES, TASKS

    def model_args(p):
        p.add_argument("model", help="a Hugging Face model folder (kompakt export, compress or finetune output)")
        p.add_argument("--task", choices=TASKS, default=None,
                       help="default: the folder's head (classify, tokens), else embed")
        p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                       help="auto: torch bf16 on CUDA; on CPU the folder's ONNX file (int8 first) when it fits "
                            "the task, else torch fp32")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        p.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's limit)")
        p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the CPUs allowed)")

    def embed_args(p):
        # None: the folder's own (a sentence-transformers export says it in 1_Pooling/), else mean, unnormalised.
        p.add_argument("--pooling", choices=POOLINGS, default=None,
                       help="embed: mean over tokens or [CLS] (default: the folder's sentence-transformers pooling, "
                            "else mean)")
        p.add_argument("--normalize", action="store_true", default=None,
                       help="embed: L2-normalise the embeddings (default: as the folder's sentence-transformers "
                            "modules say, else not)")

    p = sub.add_parser("infer", help="batch inference over text, JSONL or Parquet inputs into Parquet shards",
                       description="One output shard per input file (Parquet: id plus the outputs), written "
                                   "atomically with a manifest; a killed run continues where it stopped. Rows that "
                                   "cannot be processed go to rejected.jsonl with a reason.")
    model_args(p)
    p.add_argument("inputs", nargs="*", help="input files or globs (.txt[.gz], .jsonl[.gz], .parquet, datasets folders)")
    p.add_argument("--out", default=None, help="output folder (needed unless --export-onnx alone)")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text")
    p.add_argument("--id-field", default=None, help="JSONL/Parquet field holding the id (default: <path>:<line|row>)")
    p.add_argument("--txt-document", choices=("paragraph", "line"), default="line",
                   help="plain text: one row per line (default) or per blank-line-separated paragraph")
    embed_args(p)
    p.add_argument("--float16", action="store_true", help="embed: store embeddings as float16")
    p.add_argument("--truncate", action="store_true", help="cut texts over --max-length instead of rejecting them")
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward pass (default 8192 on a GPU, 1024 on CPU)")
    p.add_argument("--rows-per-chunk", type=int, default=4096, help="rows tokenised ahead of the model at a time")
    p.add_argument("--workers", type=int, default=1, help="local processes, each taking whole input files")
    p.add_argument("--shard", default=None, metavar="I/N", help="only input files i, i+N, ... (a Slurm array task)")
    p.add_argument("--slurm", type=int, default=None, metavar="N", help="submit as a Slurm array of N tasks")
    p.add_argument("--profile", default="local", help="with --slurm: the cluster profile")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the script, submit nothing")
    p.add_argument("--ray", action="store_true", help="run on a Ray cluster with Ray Data (pip install 'ray[data]')")
    p.add_argument("--export-onnx", action="store_true",
                   help="first write model.onnx and model_int8.onnx (the task head included) into the model folder")

    p = sub.add_parser("serve", help="an HTTP JSON API for a model, with dynamic batching",
                       description="POST /predict {\"texts\": [...]} (or {\"text\": ...}); GET /health, /ready, "
                                   "/stats. Requests arriving within --max-wait-ms share a forward pass. With "
                                   "KOMPAKT_API_KEY set, requests need the header 'Authorization: Bearer <key>'.")
    model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    embed_args(p)
    p.add_argument("--max-batch", type=int, default=64, help="texts per forward pass at most")
    p.add_argument("--max-wait-ms", type=float, default=None,
                   help="how long a forward pass waits to fill up (default 5 on a GPU; 0 on CPU: only what queued "
                        "while the model ran)")
    p.add_argument("--max-texts", type=int, default=64, help="texts per request at most")
    p.add_argument("--max-chars", type=int, default=20000, help="characters per text at most")
    p.add_argument("--timeout-s", type=float, default=30.0, help="a request waiting longer gets 503")
    p.add_argument("--no-batching", action="store_true", help="one request per forward pass (the benchmark baseline)")

    p = sub.add_parser("explain", help="word attributions of a text classifier, in text order (HTML, PNG)",
                       description="SHAP's Partition explainer over words and captum's integrated gradients; "
                                   "writes explanations.html, one PNG per text and explanations.json.")
    model_args(p)
    p.add_argument("texts", nargs="*", help="texts to explain")
    p.add_argument("--input", default=None, help="a file of texts, one per line (or JSONL with --text-field)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=("shap", "ig", "both"), default="both")
    p.add_argument("--budget", type=int, default=256, help="SHAP: model evaluations per text")
    p.add_argument("--ig-steps", type=int, default=32, help="integrated gradients: interpolation steps")
    p.add_argument("--target", default=None, help="class to explain (default: the predicted one)")
    p.add_argument("--seed", type=int, default=0)


def _slurm(args: argparse.Namespace) -> int:
    from kompakt.slurm import submit
    from kompakt.slurm.jobs import Options

    if args.slurm_command == "status":
        report = submit.status(args.run, args.overrides)
        if args.json:
            print(json.dumps(report, sort_keys=True))
        else:
            submit.print_status(report)
        return 0
    opts = Options(stage=args.stage, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   procs_per_node=args.procs_per_node, profile=args.profile, launcher=args.launcher, time=args.time,
                   account=args.account, partition=args.partition, finetune_tasks=args.finetune_tasks,
                   warn_seconds=args.warn_seconds, max_requeues=args.max_requeues, sbatch_args=args.sbatch_arg)
    submit.submit(args.recipe, args.overrides, opts, dry_run=args.dry_run)
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    from kompakt import pipeline
    from kompakt.config import load_recipe

    if args.command == "bench":
        from kompakt import bench

        # Libraries print to stdout (the HF Trainer prints its metrics dict); keep stdout for the one
        # JSON object and send everything else to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            if args.what is None:
                result = bench.run_all(recipe=args.recipe, quick=args.quick, out=args.out, peak_flops=args.peak_flops)
            else:
                result = bench.run(args.what, recipe=args.recipe, quick=args.quick, family=args.family,
                                   peak_flops=args.peak_flops)
        if args.json:
            print(json.dumps(result, sort_keys=True))
        return 0
    if args.command == "slurm":
        return _slurm(args)
    if args.command in ("infer", "serve", "explain"):
        import importlib

        module = {"infer": "batch", "serve": "server", "explain": "explain"}[args.command]
        return importlib.import_module(f"kompakt.infer.{module}").main(args)
    if args.command == "export":
        from pathlib import Path

        from kompakt.export import export_checkpoint

        ckpt = Path(args.checkpoint)
        out = export_checkpoint(ckpt, Path(args.out) if args.out else ckpt.with_name(ckpt.name + "-hf"))
        print(out)
        return 0
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command == "validate":
        print(json.dumps(recipe.model_dump(mode="json"), indent=2, ensure_ascii=False))
        return 0
    if args.command == "pretrain" and args.dry_run:
        pipeline.pretrain_dry_run(recipe, world_size=args.world_size)
        return 0
    p = pipeline.Pipeline(recipe)
    if args.command == "run":
        done = p.run_all(force=args.force)
        _run_summary(done, recipe)
    else:
        p.ensure(args.command, force=args.force)
    return 0


def _run_summary(done: dict, recipe) -> None:
    """The end of `kompakt run`: the pretrained model's fill-mask against a unigram guess, and where the report is."""
    from kompakt.log import info

    if done.get("pretrain") is not None and done.get("tokenizer") is not None:
        from kompakt.fill_mask import fill_mask_check

        fill_mask_check(done["pretrain"] / "export", done["tokenizer"])
    if done.get("eval") is not None:
        info(f"report: {done['eval'] / 'report.html'} (and report.md, results.json, the PNG plots beside it)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow the options too (`kompakt slurm submit R --stage all data.num_shards=2`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _dispatch(args)
    except KompaktError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full disk, a quota, a read-only or forbidden path: the user's to fix, so one line too.
        from kompakt.runs import disk_error_message

        message = disk_error_message(err)
        if message is None or args.debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
