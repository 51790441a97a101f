"""`kompakt bench ...`: benchmarks, each against a baseline measured in the same run.

Benchmarks are not timed tests. Each returns a dict with at least `ratio` (ours over the
baseline), `device` and `versions`; the CLI prints a table and, with `--json`, the dict.
The stage packages hold the measurements; this module dispatches, resolves the upstream stage
folders they measure on (stage code never imports the pipeline) and adds the device.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from kompakt.runs import git_commit, package_versions
from kompakt.speed import device_name  # noqa: F401  (the device of every benchmark)


def recipe_texts(rec, per_file: int) -> list[str]:
    """Up to `per_file` paragraphs (newlines joined) of each of the recipe's first 4 raw inputs."""
    import gzip

    texts = []
    for f in rec.resolve_inputs()[:4]:
        raw = f.read_bytes()
        text = (gzip.decompress(raw) if f.suffix == ".gz" else raw).decode("utf-8", "replace")
        texts += [d.replace("\n", " ") for d in text.split("\n\n") if d.strip()][:per_file]
    return texts


def use(what: str, recipe: str, quick: bool) -> dict:
    """`kompakt bench batch` / `serve`: a released model put to use, on the recipe's text (kompakt.infer.bench)."""
    from kompakt.config import load_recipe

    rec = load_recipe(recipe)
    texts = recipe_texts(rec, 4096)
    root = rec.path(rec.run_dir) / "bench-use"
    if what == "batch":
        from kompakt.infer.bench import batch_throughput

        return batch_throughput(texts, root, quick=quick)
    from kompakt.infer.bench import serve_throughput

    return serve_throughput(texts, root, quick=quick)


def infer(recipe: str, quick: bool) -> dict:
    """`kompakt bench infer`: TinyBERT's shapes (a 12x768 teacher, a 4x312 student, seeded random weights:
    speed does not depend on the values) and, when the recipe has a compress section, its teacher and
    students, in PyTorch fp32/int8 and ONNX Runtime fp32/int8; throughput on the recipe's own text."""
    from kompakt.compress.bench_infer import infer_benchmark, synthetic_models
    from kompakt.config import load_recipe
    from kompakt.pipeline import Pipeline

    rec = load_recipe(recipe)
    root = rec.path(rec.run_dir) / "bench-infer"
    texts = recipe_texts(rec, 512)
    models = synthetic_models(root / "synthetic")
    out = {"synthetic": infer_benchmark(models, texts, quick=quick, work_dir=root / "onnx-synthetic")}
    if rec.compress is not None:
        p = Pipeline(rec)
        stage = p.ensure("compress")
        teacher = (p.upstream_dir("pretrain") / "export" if rec.compress.teacher == "pretrain"
                   else rec.path(rec.compress.teacher))
        own = {"teacher": teacher}
        own.update({s.name: stage / "students" / s.name for s in rec.compress.students if s.method != "quantize"})
        out["recipe"] = infer_benchmark(own, texts, quick=quick, work_dir=root / "onnx-recipe")
    result = dict(out["synthetic"])
    result["recipe_models"] = out.get("recipe")
    return result


def run(what: str, recipe: str, quick: bool = False, family: str = "bert", peak_flops: float | None = None) -> dict:
    """Run one benchmark and return its figures (printed as a table on stderr by the stage code).

    `peak_flops` (mfu only) replaces the GPU's data-sheet peak; given, mfu also runs on CPU (a test of its
    arithmetic, not a measurement). Without a GPU or a peak, mfu raises a DeviceError before any stage runs."""
    if what == "data":
        from kompakt.data_prep.bench import dedup_rate
        from kompakt.tokenization.bench import pretokenize_throughput

        from kompakt.config import load_recipe
        from kompakt.pipeline import Pipeline

        try:  # data_prep failing must not hide the tokenizer figures: the bench falls back to raw text
            prepared = Pipeline(load_recipe(recipe)).ensure("prepare")
        except Exception as err:
            prepared = err
        result = pretokenize_throughput(recipe, quick=quick, prepared=prepared)
        result["dedup"] = dedup_rate(recipe, quick=quick)
    elif what == "mfu":
        from kompakt.config import load_recipe
        from kompakt.pipeline import Pipeline
        from kompakt.pretrain.bench_model import mfu_device, mfu_throughput

        mfu_device(peak_flops)  # refuse a CPU-only machine before building the tokenizer stage
        rec = load_recipe(recipe)
        result = mfu_throughput(rec, Pipeline(rec).ensure("tokenizer"), quick=quick, peak=peak_flops)
    elif what in ("model", "train", "families"):
        # The dispatcher resolves the upstream stages; the stage benchmarks only receive folders.
        from kompakt.config import load_recipe
        from kompakt.pipeline import Pipeline

        rec = load_recipe(recipe)
        tok_stage = Pipeline(rec).ensure("tokenizer")
        if what == "families":
            from kompakt.pretrain.bench import equal_time

            result = equal_time(rec, tok_stage, quick=quick)
        elif what == "model":
            from kompakt.pretrain.bench_model import model_throughput

            result = model_throughput(rec, tok_stage, quick=quick, family=family)
        else:
            from kompakt.pretrain.bench import train_throughput

            result = train_throughput(rec, tok_stage, quick=quick, family=family)
    elif what == "infer":
        result = infer(recipe, quick=quick)
    elif what in ("batch", "serve"):
        result = use(what, recipe, quick=quick)
    else:
        raise ValueError(f"unknown benchmark {what!r}")
    result["device"] = device_name()
    result["versions"] = package_versions()
    return result


# Every benchmark of `kompakt bench` (no argument), in this order: the cheap data figures first, serving last.
SUITE = (("data", "bert"), ("model", "bert"), ("mfu", "bert"), ("train", "bert"), ("train", "modernbert"),
         ("families", "bert"), ("infer", "bert"), ("batch", "bert"), ("serve", "bert"))
# What each benchmark's `ratio` compares (ours over the baseline measured in the same run).
RATIO_OF = {
    "data": "pre-tokenisation MB/s over raw tokenizer.encode_batch",
    "model": "packed MLM training tokens/s over stock BertForMaskedLM on padded rows (ratio_concat: over concatenated rows)",
    "mfu": "BERT-base (seq 512, bf16, GPU) training tokens/s, = MFU, over stock BertForMaskedLM's stronger feed",
    "train": "end-to-end pretraining tokens/s over the HF Trainer's fastest feed",
    "train-modernbert": "the same for ModernBERT against stock ModernBertForMaskedLM",
    "families": "held-out MLM loss at equal time: best of ALBERT / post-LN BERT over ModernBERT's (>1: ModernBERT ahead)",
    "infer": "CPU throughput of the best student runtime over the teacher in PyTorch fp32",
    "batch": "kompakt infer rows/s (fastest runtime) over transformers.pipeline(batch_size=32), same model",
    "serve": "requests/s with dynamic batching over one request per forward pass, 64 clients",
}


def run_all(recipe: str, quick: bool = False, out: str | None = None, suite=SUITE,
            peak_flops: float | None = None) -> dict:
    """Every benchmark in SUITE on one recipe; one failing benchmark is recorded with its error and the rest
    still run, and one this machine cannot run (mfu without a GPU) as skipped, with the reason. Writes
    bench.json (each result whole, plus device, versions, commit and date) and prints one table of the ratios."""
    import datetime
    import traceback

    from kompakt.config import load_recipe
    from kompakt.errors import DeviceError
    from kompakt.log import info, table
    from kompakt.runs import write_json_atomic

    results: dict[str, dict] = {}
    for what, family in suite:
        key = what if family == "bert" else f"{what}-{family}"
        t0 = time.perf_counter()
        info(f"bench: {key} ...")
        try:
            results[key] = run(what, recipe=recipe, quick=quick, family=family, peak_flops=peak_flops)
        except DeviceError as err:  # not a failure: this machine lacks what the benchmark measures against
            results[key] = {"skipped": str(err)}
            info(f"bench: {key} skipped: {err}")
        except Exception as err:  # recorded, not hidden: the table shows it and bench.json keeps the traceback
            results[key] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                            "traceback": traceback.format_exc(limit=5)}
        results[key]["seconds"] = round(time.perf_counter() - t0, 1)
    rec = load_recipe(recipe)
    summary = {"device": device_name(), "versions": package_versions(), "commit": git_commit(),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "recipe": recipe, "quick": quick,
               "ratios": {k: v.get("ratio") for k, v in results.items()}, "benchmarks": results}
    ok = [v["ratio"] for v in results.values() if isinstance(v.get("ratio"), (int, float))]
    summary["ratio"] = round(float(np.exp(np.mean(np.log(ok)))), 3) if ok else None  # geometric mean
    path = Path(out) if out else rec.path(rec.run_dir) / "bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, summary)
    table(f"kompakt bench: {summary['device']}, {summary['date']}, commit {(summary['commit'] or '-')[:10]}",
          ["benchmark", "ratio", "what the ratio compares", "seconds"],
          [(k, _ratio_cell(v), v.get("skipped") or RATIO_OF.get(k, ""), v["seconds"]) for k, v in results.items()])
    info(f"bench: wrote {path}")
    return summary


def _ratio_cell(result: dict):
    """The table's ratio column: the ratio, or why there is none."""
    if "error" in result:
        return f"failed: {result['error'][:60]}"
    return "skipped" if "skipped" in result else result.get("ratio", "-")
