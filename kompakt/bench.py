"""`kompakt bench ...`: benchmarks, each against a baseline measured in the same run.

Benchmarks are not timed tests. Each returns a dict with at least `ratio` (ours over the
baseline), `device` and `versions`; the CLI prints a table and, with `--json`, the dict.
The stage packages hold the measurements; this module dispatches, resolves the upstream stage
folders they measure on (stage code never imports the pipeline) and adds the device.
"""

from __future__ import annotations

from pathlib import Path

from kompakt.runs import package_versions
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


def run(what: str, recipe: str, quick: bool = False, family: str = "bert") -> dict:
    """Run one benchmark and return its figures (printed as a table on stderr by the stage code)."""
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
    elif what in ("model", "train"):
        # The dispatcher resolves the upstream stages; the stage benchmarks only receive folders.
        from kompakt.config import load_recipe
        from kompakt.pipeline import Pipeline

        rec = load_recipe(recipe)
        tok_stage = Pipeline(rec).ensure("tokenizer")
        if what == "model":
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
