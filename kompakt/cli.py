"""The `kompakt` console script: one subcommand per stage.

    kompakt prepare RECIPE [key.sub=value ...]     clean the corpus (data_prep)
    kompakt tokenizer RECIPE [...]                 train a tokenizer and write packed token shards
    kompakt pretrain RECIPE [...] [--dry-run]      pretrain with DeepSpeed (CPU, GPU, many nodes)
    kompakt export CHECKPOINT_DIR [--out DIR]      a training checkpoint as a Hugging Face folder
    kompakt run RECIPE [...]                       every stage the recipe has, in order
    kompakt validate RECIPE [...]                  check a recipe and print it resolved
    kompakt bench data|model|train|infer [--json]  benchmarks, with ratios against a baseline

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
    "train": "end-to-end pretraining tokens/s (loader + DeepSpeed + optimizer) against the HF Trainer, "
             "line-by-line and concatenated",
    "infer": "CPU latency and throughput of teacher and students in PyTorch fp32/int8 and ONNX Runtime "
             "fp32/int8, against the teacher in PyTorch fp32 (TinyBERT's 12x768 and 4x312 shapes too)",
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
    p.add_argument("what", choices=sorted(BENCHES))
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--recipe", default="recipes/demo-nb.yaml", help="recipe whose corpus and sizes to use")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    from kompakt import pipeline
    from kompakt.config import load_recipe

    if args.command == "bench":
        from kompakt import bench

        # Libraries print to stdout (the HF Trainer prints its metrics dict); keep stdout for the one
        # JSON object and send everything else to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            result = bench.run(args.what, recipe=args.recipe, quick=args.quick)
        if args.json:
            print(json.dumps(result, sort_keys=True))
        return 0
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
        p.run_all(force=args.force)
    else:
        p.ensure(args.command, force=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
