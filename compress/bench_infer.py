"""`kompakt bench infer`: CPU inference speed of a teacher and its students in four runtimes.

For every model (the first one is the teacher, the baseline) and every runtime in
`kompakt.compress.speed.RUNTIMES` (PyTorch fp32 with sdpa attention, PyTorch dynamic int8, ONNX Runtime
fp32, ONNX Runtime dynamic int8), in one run on one machine:

- latency: batch 1, 128 tokens, median over repeats, at 1 and at 2 threads;
- throughput: sequences/s over the given texts tokenised by the model's own tokenizer (cut at 128
  tokens), sorted by length and cut into batches of 32 (bucketing keeps padding to a few percent), at
  the largest thread count.

`speedup` of a row is the teacher's torch-fp32 latency at 1 thread over the row's latency at 1 thread;
`ratio` is the best speedup. Rounds interleave all (model, runtime) pairs so that load from other work on
a shared machine spreads over every row instead of landing on one. Weights do not change speed, so
`synthetic_models()` gives TinyBERT's pair (12x768 teacher, 4x312 student) with random weights for
stating TinyBERT's reported 9.4x, the int8 gain and the best combination on this CPU.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from kompakt.compress import speed
from kompakt.errors import ConfigError, DataError
from kompakt.log import info, table
from kompakt.speed import TINYBERT_SHAPES, minilm_tokenizer_dir

SEQ_LEN = 128
BATCH_SIZE = 32
# What the synthetic pair is measured against (TinyBERT, Jiao et al. 2020, Table 1: TinyBERT-4 is 9.4x
# faster than BERT-base), and the gains a compact model in int8 should add on top.
GOALS = {"student_over_teacher_fp32": 9.4, "int8_over_fp32": 1.5, "best_over_teacher_fp32": 25.0}
SYNTHETIC = TINYBERT_SHAPES  # the shapes measured with seeded random weights
MINILM_TOKENIZER = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def synthetic_models(out_root: Path) -> dict[str, Path]:
    """TinyBERT's teacher and student shapes as stock BERT folders with seeded random weights.

    teacher-12x768: 12 layers, hidden 768, 12 heads, FFN 3072 (BERT-base, 109M parameters);
    student-4x312: 4 layers, hidden 312, 12 heads, FFN 1200 (TinyBERT-4, 14.4M parameters). Both use the
    uncased 30,522-entry WordPiece vocabulary of all-MiniLM-L6-v2, whose tokenizer files are copied in.
    A folder already complete (config.json, model.safetensors and tokenizer with the same shape) is kept.
    """
    from transformers import BertConfig, BertModel

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    tok_src = minilm_tokenizer_dir("synthetic models")
    out = {}
    for name, shape in SYNTHETIC.items():
        final = out_root / name
        cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)
        out[name] = final
        if _complete_synthetic(final, shape):
            continue
        torch.manual_seed(0)
        model = BertModel(cfg).eval()
        tmp = out_root / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _save(model, cfg, tmp)
        for f in MINILM_TOKENIZER:
            if (tok_src / f).is_file():
                shutil.copyfile(tok_src / f, tmp / f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a kill before this leaves only the temporary folder
    return out


def _save(model, cfg, folder: Path) -> None:
    """config.json and model.safetensors as save_pretrained writes them for a BertModel (no tied weights).

    save_pretrained itself imports deepspeed, whose start-up warning lands on stdout, where
    `kompakt bench --json` prints its one JSON object.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    cfg.architectures = [type(model).__name__]
    cfg.to_json_file(str(folder / "config.json"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: on a shared machine they say how much other work ran alongside."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def _complete_synthetic(folder: Path, shape: dict) -> bool:
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (all(cfg.get(k) == v for k, v in shape.items()) and (folder / "model.safetensors").is_file()
            and (folder / "tokenizer.json").is_file())


def _param_count(runner) -> int:
    return sum(p.numel() for p in runner.model.parameters())


def infer_benchmark(models: dict[str, Path], texts: list[str], *, quick: bool, threads: tuple[int, ...] = (1, 2),
                    work_dir: Path | None = None) -> dict:
    """Latency and throughput of every model in every runtime; the first model is the teacher (baseline).

    `texts`: real documents for throughput (the first 64 with `quick`, else 256). `quick` also cuts
    latency repeats to 3 in one round (a few seconds for tiny models); the full run takes 10 repeats in
    each of 3 rounds. ONNX graphs are exported into `work_dir` (a temporary folder by default).

    Returns rows (model, runtime, layers, hidden, params, latency_ms: median at 1 thread,
    latency_ms_2threads, latency_ms_min: fastest sample at 1 thread, throughput, speedup), ratio (best
    speedup), best (its model and runtime), int8_over_fp32 per model and runtime family (latency at 1
    thread, throughput), goals (TinyBERT's figures against the measured ones, for synthetic pairs), vnni,
    cpu, threads, throughput_threads, loadavg (before and after: other work on a shared machine moves
    medians by 10-40%, and a 2-thread figure far more when another process holds one of two cores).
    """
    if not models:
        raise ConfigError("bench infer needs at least one model folder (the first is the teacher)")
    texts = [t for t in texts if t.strip()][: 64 if quick else 256]
    if not texts:
        raise DataError("bench infer needs non-empty texts for the throughput batches")
    threads = tuple(threads)
    if 1 not in threads:
        raise ConfigError(f"bench infer threads {threads} must include 1 (speedups are at 1 thread)")
    rounds, repeats, warmup = (1, 3, 1) if quick else (3, 10, 2)
    tp_threads = max(threads)
    models = {name: Path(p) for name, p in models.items()}
    for name, p in models.items():
        if not (p / "config.json").is_file():
            raise DataError(f"bench infer model {name!r}: {p} has no config.json; give a Hugging Face folder")

    from kompakt.compress.batches import text_batches

    tmp = tempfile.TemporaryDirectory(prefix="kompakt-bench-infer-") if work_dir is None else None
    work = Path(tmp.name if tmp else work_dir)
    try:
        runners, batches, shapes = {}, {}, {}
        for name, p in models.items():
            batches[name] = text_batches(p, texts, max_len=SEQ_LEN, batch_size=BATCH_SIZE)
            for rt in speed.RUNTIMES:
                runners[name, rt] = speed.make_runner(p, rt, onnx_dir=work / _safe(name))
            r = runners[name, "torch-fp32"]
            shapes[name] = {"layers": r.model.config.num_hidden_layers, "hidden": r.model.config.hidden_size,
                            "params": _param_count(r)}
        load_before = _loadavg()
        lat = {(k, t): [] for k in runners for t in threads}
        tput = {k: [] for k in runners}
        for i in range(rounds):
            info(f"bench infer: round {i + 1}/{rounds}, {len(models)} models x {len(speed.RUNTIMES)} runtimes")
            for key, r in runners.items():
                for t in threads:
                    lat[key, t] += speed.latency_samples(r, seq_len=SEQ_LEN, threads=t, repeats=repeats,
                                                         warmup=warmup)
                tput[key].append(speed.throughput(r, batches[key[0]], threads=tp_threads, warmup=1))
    finally:
        if tmp is not None:
            tmp.cleanup()
    result = _result(models, shapes, lat, tput, threads, tp_threads, len(texts), quick)
    result["loadavg"] = {"before": load_before, "after": _loadavg()}
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _result(models, shapes, lat, tput, threads, tp_threads, num_texts, quick) -> dict:
    teacher = next(iter(models))
    med = {k: statistics.median(v) for k, v in lat.items()}
    base = med[(teacher, "torch-fp32"), 1]
    second = next((t for t in threads if t != 1), None)
    rows = []
    for name, rt in tput:
        row = {"model": name, "runtime": rt, **shapes[name], "latency_ms": med[(name, rt), 1]}
        if second is not None:
            row[f"latency_ms_{second}threads"] = med[(name, rt), second]
        # The fastest sample: what the machine does without interference from other work on it.
        row["latency_ms_min"] = min(lat[(name, rt), 1])
        row["throughput"] = statistics.median(tput[name, rt])
        row["speedup"] = base / row["latency_ms"]
        rows.append(row)
    by = {(r["model"], r["runtime"]): r for r in rows}

    def int8_gain(name: str, fam: str) -> dict[str, float]:
        fp32, q8 = by[name, f"{fam}-fp32"], by[name, f"{fam}-int8"]
        return {"latency": fp32["latency_ms"] / q8["latency_ms"],
                "throughput": q8["throughput"] / fp32["throughput"]}

    int8 = {name: {fam: int8_gain(name, fam) for fam in ("torch", "ort")} for name in models}
    best = max(rows, key=lambda r: r["speedup"])
    students = [n for n in models if n != teacher]
    goals = {}
    if students:
        fp32 = {n: by[n, "torch-fp32"]["speedup"] for n in students}
        gain = {n: max(int8[n]["torch"]["latency"], int8[n]["ort"]["latency"]) for n in students}
        goals = {
            "student_over_teacher_fp32": {
                "target": GOALS["student_over_teacher_fp32"], "measured": fp32,
                "met": all(v >= GOALS["student_over_teacher_fp32"] for v in fp32.values())},
            "int8_over_fp32": {"target": GOALS["int8_over_fp32"], "measured": gain,
                               "met": all(v >= GOALS["int8_over_fp32"] for v in gain.values())},
            "best_over_teacher_fp32": {"target": GOALS["best_over_teacher_fp32"], "measured": best["speedup"],
                                       "met": best["speedup"] >= GOALS["best_over_teacher_fp32"]},
        }
    vnni = speed.has_vnni()
    result = {
        "rows": rows, "ratio": best["speedup"], "best": {"model": best["model"], "runtime": best["runtime"]},
        "baseline": {"model": teacher, "runtime": "torch-fp32", "latency_ms": base},
        "int8_over_fp32": int8, "goals": goals, "vnni": vnni, "cpu": speed.cpu_name(),
        "cores": speed.available_cores(), "threads": list(threads), "throughput_threads": tp_threads,
        "seq_len": SEQ_LEN, "batch_size": BATCH_SIZE, "num_texts": num_texts, "quick": quick,
    }
    # Short headers: a table on a redirected stderr is 80 columns wide; the JSON has the full keys.
    cols = ["model", "runtime", "LxH", "params", "ms@1t"]
    if second is not None:
        cols.append(f"ms@{second}t")
    cols += [f"seq/s@{tp_threads}t", "speedup"]
    table(f"bench infer: batch 1 x {SEQ_LEN} latency (median), batch {BATCH_SIZE} throughput on {num_texts} "
          f"texts; {result['cpu']}, {'VNNI' if vnni else 'no VNNI'}",
          cols, [[r["model"], r["runtime"], f"{r['layers']}x{r['hidden']}", f"{r['params'] / 1e6:.1f}M",
                  r["latency_ms"], *([r[f"latency_ms_{second}threads"]] if second is not None else []),
                  r["throughput"], f"{r['speedup']:.2f}x"] for r in rows])
    for name, fams in int8.items():
        info(f"int8 over fp32, {name}: torch {fams['torch']['latency']:.2f}x, ONNX Runtime "
             f"{fams['ort']['latency']:.2f}x (latency, 1 thread, {'with' if vnni else 'without'} VNNI)")
    return result
