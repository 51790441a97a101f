"""The compress stage: one teacher -> several students, each a stock Hugging Face folder with a model card.

Reads top to bottom: the teacher (this recipe's pretraining export or a stock BERT/ALBERT folder)
and its checks (model type, the vocabulary against the tokenizer stage's, every student's recipe
entry) before anything runs; then each student in recipe order, by its method; then the manifest.

The stage directory `<run_dir>/compress-<hash>/` is used in place, like pretraining's: a distilled
student trains in `work/<name>/` with kill-safe checkpoints, and each finished student is written to
`students/<name>.tmp` and renamed to `students/<name>/`, so a folder there is whole. A rerun skips
students already written, and `manifest.json` with `complete: true` comes last.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from kompakt import dist
from kompakt.compress_config import CompressConfig
from kompakt.errors import ConfigError, DataError
from kompakt.log import info, table
from kompakt.loop import StopFlag, exit_for_requeue, test_hook
from kompakt.runs import content_digest, package_versions, write_json_atomic
from kompakt.speed import cpu_name, folder_params

STUDENT_INFO = "kompakt_student.json"
MODEL_FILES = ("model.safetensors", "model.onnx", "model_int8.onnx", "pytorch_model.bin")


def check_teacher(teacher_dir: Path) -> dict:
    """The teacher folder's config.json, refused with one line unless it is a BERT, ALBERT, ModernBERT or Lattice-BERT
    model."""
    cfg_path = teacher_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"compress.teacher: {teacher_dir} has no config.json; point at a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError:
        raise DataError(f"{cfg_path} is not valid JSON; re-export the teacher") from None
    if cfg.get("model_type") not in ("bert", "albert", "modernbert", "lattice-bert"):
        raise ConfigError(f"compress.teacher: {teacher_dir} is a {cfg.get('model_type')!r} model; compress supports "
                          f"bert, albert, modernbert and lattice-bert teachers")
    return cfg


def vocabulary(folder: Path) -> dict[str, int]:
    """token -> id of the tokenizer saved in a folder (tokenizer.json, or whatever AutoTokenizer reads)."""
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    except Exception:
        raise DataError(f"{folder} holds no tokenizer; save the teacher's tokenizer beside its weights") from None


def check_same_vocab(teacher_dir: Path, tokenizer_dir: Path, what: str = "the tokenizer stage") -> None:
    """Teacher and data (or student) must mean the same thing by every id: compare vocabularies, not names."""
    a, b = vocabulary(teacher_dir), vocabulary(tokenizer_dir)
    if a == b:
        return
    only_a = sorted(set(a) - set(b))[:3]
    moved = [t for t in a if t in b and a[t] != b[t]][:3]
    detail = (f"{len(a):,} vs {len(b):,} tokens" + (f", e.g. {only_a} only in the teacher's" if only_a else "")
              + (f", {moved} with other ids" if moved else ""))
    raise DataError(f"the teacher {teacher_dir} and {what} ({tokenizer_dir}) have different vocabularies ({detail}); "
                    f"distil on data tokenised with the teacher's own tokenizer")


def check_same_lexicon(teacher_dir: Path, tokenizer_dir: Path) -> None:
    """A Lattice-BERT's word ids are the lines of its lexicon.txt: the teacher's and the data's must be one file."""
    a, b = teacher_dir / "lexicon.txt", tokenizer_dir / "lexicon.txt"
    for path in (a, b):
        if not path.is_file():
            raise DataError(f"{path} does not exist; a Lattice-BERT teacher and the tokenizer stage it is distilled on "
                            f"both need the lexicon.txt that numbers its words")
    if a.read_bytes() != b.read_bytes():
        raise DataError(f"the teacher's {a} and the tokenizer stage's {b} differ, so word ids would mean other "
                        f"words; distil on data tokenised with the teacher's own tokenizer and lexicon")


def disk_bytes(folder: Path) -> int:
    """Bytes of the model a folder serves (the int8 graph of an ONNX student, else its weights or fp32
    graph); tokenizer and card not counted."""
    for name in ("model_int8.onnx", "model.safetensors", "model.onnx", "pytorch_model.bin"):
        if (folder / name).is_file():
            return (folder / name).stat().st_size
    return 0


def count_params(folder: Path) -> int:
    """Parameters of a folder's weights, tied ones once (0 for an ONNX-only folder)."""
    return folder_params(folder).get("params", 0)


def prune_rows(f: dict) -> list[tuple[str, str]]:
    """The card rows of a pruned student: what was removed (or only zeroed) and the parameter counts."""
    before, after = f["num_params_before"], f["num_params_after"]
    rows = [("pruning", f"importance {f['importance']}; heads {f['heads_fraction']:.0%}, FFN neurons "
                        f"{f['ffn_fraction']:.0%}; FFN neurons kept per layer {f['ffn_neurons_kept_per_layer'][0]:,}; "
                        f"heads kept per layer {f['heads_kept_per_layer']}"),
            ("parameters removed", f"{before:,} -> {after:,} ({100 * (before - after) / before:.1f}% fewer); "
                                   f"{f['params_zeroed']:,} more zeroed; encoder sparsity {100 * f['sparsity']:.1f}%")]
    if f.get("note"):
        rows.append(("note", f["note"]))
    return rows


def quantize_rows(f: dict) -> list[tuple[str, str]]:
    """The card rows of an int8 student: agreement with fp32 and the measured int8/fp32 speed, as prose."""
    a = f.get("agreement") or {}
    parts = []
    if "argmax_agreement" in a:
        parts.append(f"argmax {100 * a['argmax_agreement']:.2f}% of {a['argmax_positions']:,} predictions")
    if a.get("nn_agreement") is not None:  # None: fewer than 3 held-out sentences, no neighbours to compare
        parts.append(f"nearest-neighbour {100 * a['nn_agreement']:.1f}% of {a['num_sequences']:,} sentences")
    if "cosine_mean" in a:
        parts.append(f"embedding cosine {a['cosine_mean']:.5f} (min {a['cosine_min']:.5f})")
    if "onnx_fp32_max_abs_diff" in a:
        parts.append(f"ONNX fp32 within {a['onnx_fp32_max_abs_diff']:.1e} of PyTorch")
    rows = [("agreement with fp32", "; ".join(parts) or "not measured")]
    if "note" in f:
        rows.append(("int8 against fp32", f["note"]))
    return rows


def student_card(name: str, method: str, teacher_dir: Path, teacher_label: str, folder: Path, rows: list,
                 speed: dict | None, release: dict, recipe_name: str, params_from: Path | None = None) -> str:
    """README.md of a student: what it came from, how, its size and its measured speed against the teacher."""
    cfg = json.loads((folder / "config.json").read_text())
    t_cfg = json.loads((teacher_dir / "config.json").read_text())
    meta = ["library_name: transformers", "pipeline_tag: feature-extraction",
            f"tags: [kompakt, {cfg.get('model_type')}, {method}, compressed]"]
    if release.get("language"):
        meta.append(f"language: [{', '.join(release['language'])}]")
    if release.get("license"):
        meta.append(f"license: {release['license']}")
    size = [("teacher", f"{teacher_label}: {t_cfg['num_hidden_layers']} layers x {t_cfg['hidden_size']}, "
                        f"{t_cfg['num_attention_heads']} heads, {count_params(teacher_dir):,} parameters, "
                        f"{disk_bytes(teacher_dir) / 1e6:.1f} MB"),
            ("method", method),
            ("student", f"{cfg['num_hidden_layers']} layers x {cfg['hidden_size']}, {cfg['num_attention_heads']} heads, "
                        f"intermediate {cfg['intermediate_size']}, {count_params(params_from or folder):,} parameters"
                        + (" (int8 weights)" if params_from else "")),
            ("disk size", f"{disk_bytes(folder) / 1e6:.1f} MB (teacher {disk_bytes(teacher_dir) / 1e6:.1f} MB)")]
    if speed:
        size.append(("measured speed", speed["text"]))
    rows = size + [tuple(r) for r in rows]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    load = ("`onnxruntime.InferenceSession(path + '/model_int8.onnx')` (inputs: input_ids, attention_mask, "
            "token_type_ids)" if (folder / "model_int8.onnx").is_file()
            else "`kompakt.register_hf()` and then `transformers.AutoModel.from_pretrained(path)` (inputs: lattices "
                 "of characters and the words of its lexicon.txt, see kompakt.lattice_inputs.build_lattice)"
            if cfg.get("model_type") == "lattice-bert" else "`transformers.AutoModel.from_pretrained(path)`")
    return f"""---
{chr(10).join(meta)}
---
# {recipe_name} / {name}

A compressed student of `{teacher_label}`, made by kompakt's `{method}`.

| | |
|---|---|
{body}

Load with {load}; the tokenizer in this folder is the teacher's.
"""


def measure_speed(teacher_dir: Path, folder: Path, runtime: str = "torch-fp32") -> dict:
    """Latency at batch 1, sequence 128, 1 thread: the student in its runtime against the teacher in
    PyTorch fp32 (what a user runs without kompakt), medians of 10 after warmup, on this machine."""
    from kompakt.compress import speed

    t = speed.latency_ms(speed.make_runner(teacher_dir, "torch-fp32"), seq_len=128, threads=1, repeats=10)
    s = speed.latency_ms(speed.make_runner(folder, runtime), seq_len=128, threads=1, repeats=10)
    return {"teacher_ms": t, "student_ms": s, "speedup": t / s, "runtime": runtime,
            "text": f"{s:.1f} ms in {runtime} vs the teacher's {t:.1f} ms in torch-fp32 ({t / s:.2f}x) at batch 1, "
                    f"sequence 128, 1 thread, {cpu_name()}"}


def _requeue(why: str) -> None:
    exit_for_requeue("compress", why)


def run(cfg: CompressConfig, teacher_dir: Path, tokenizer_stage: Path, stage_dir: Path, *, stage_hash: str,
        inputs: dict, recipe_name: str, release: dict, teacher_label: str, cache_root: Path) -> Path:
    """Make every student of `cfg` into `stage_dir/students/`; returns `stage_dir` once the manifest is written."""
    with StopFlag() as stop:
        return _run(cfg, Path(teacher_dir), Path(tokenizer_stage), Path(stage_dir), stage_hash=stage_hash,
                    inputs=inputs, recipe_name=recipe_name, release=release, teacher_label=teacher_label,
                    cache_root=cache_root, stop=stop)


def _run(cfg: CompressConfig, teacher_dir: Path, tokenizer_stage: Path, stage_dir: Path, *, stage_hash: str,
         inputs: dict, recipe_name: str, release: dict, teacher_label: str, cache_root: Path, stop) -> Path:
    from kompakt.engine import init_distributed
    from kompakt.hf import load_pretrained

    from kompakt.compress import distill

    t0 = time.perf_counter()
    test_hook("startup")
    # --- every check a recipe can fail, before anything is written or trained
    check_teacher(teacher_dir)
    check_same_vocab(teacher_dir, tokenizer_stage / "tokenizer")
    teacher = load_pretrained(teacher_dir)
    has_head = distill.encoder_and_head(teacher)[1] is not None
    if teacher.cfg.family == "lattice" and any(s.method == "distill" for s in cfg.students):
        check_same_lexicon(teacher_dir, tokenizer_stage / "tokenizer")  # distillation's batches carry word ids
    for s in cfg.students:
        if teacher.cfg.family == "lattice" and (s.method not in ("distill", "layer_drop", "quantize")
                                                or (s.method == "quantize" and s.backend == "onnx")):
            what = s.method + (" with backend onnx" if s.method == "quantize" else "")
            raise ConfigError(f"students.{s.name}: {what} does not support a Lattice-BERT teacher yet (its inputs "
                              f"carry lexicon words and lattice positions); use distill, layer_drop, or quantize "
                              f"with backend: torch")
        if s.method == "distill":
            distill.prepare(s, teacher.cfg, has_head)
            if s.student.hidden_size and s.student.hidden_size > teacher.cfg.hidden_size:
                raise ConfigError(f"students.{s.name}.student.hidden_size={s.student.hidden_size} is wider than the "
                                  f"teacher's {teacher.cfg.hidden_size}; a student must not be wider than its teacher")
            if s.student.init not in ("teacher", "random"):
                check_same_vocab(teacher_dir, Path(s.student.init), what=f"students.{s.name}.student.init")
        if s.method == "layer_drop" and s.source == "teacher":  # e.g. ModernBERT's layer 0 cannot go
            from kompakt.compress.layerdrop import check_plan

            check_plan(teacher_dir, s.strategy, s.num_drop, key=f"students.{s.name}")
        if s.method == "theseus":
            from kompakt.compress.theseus import check as check_theseus

            check_theseus(s, teacher)
        if s.method == "quantize":  # a backend that is not installed: one line now, not after training
            from kompakt.compress import quantize

            quantize.require_onnx("quantize backend 'onnx'") if s.backend == "onnx" else quantize._torch_quantize_dynamic()

    env = dist.setup_env()
    init_distributed(env)
    out_root, work_root = stage_dir / "students", stage_dir / "work"
    if env.is_main:
        out_root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(stage_dir / "config.json", cfg.model_dump(mode="json"))
    dist.barrier()

    heldout = heldout_hf_batches(tokenizer_stage, cfg.heldout_examples)
    teacher_digest = content_digest(teacher_dir / "model.safetensors")
    made: dict[str, dict] = {}
    for s in cfg.students:
        final = out_root / s.name
        source = teacher_dir if s.source == "teacher" else out_root / s.source
        if (final / STUDENT_INFO).is_file():
            info(f"compress: {s.name}: complete, skipped ({final})")
            made[s.name] = json.loads((final / STUDENT_INFO).read_text())
            continue
        tmp = out_root / f"{s.name}.tmp"
        if env.is_main and tmp.exists():
            shutil.rmtree(tmp)
        rows: list[tuple[str, str]] = [("source", "the teacher" if s.source == "teacher" else f"student `{s.source}`")]
        figures: dict = {}
        if s.method == "distill":
            work = work_root / s.name
            work.mkdir(parents=True, exist_ok=True)
            out = distill.train_student(s, teacher, teacher_digest, tokenizer_stage, work,
                                        cache_root=cache_root / f"teacher-{teacher_digest[:16]}", stop=stop,
                                        extra_state={"recipe": recipe_name})
            result = finish_training(s.name, out, tmp, tokenizer_stage, has_head, env.is_main)
            figures = {k: out[k] for k in ("num_params", "mapping", "init", "mlm_before", "mlm_after", "mlm_teacher",
                                           "cache")}
            figures.update(steps=result.step, tokens_seen=result.tokens_seen, eval_loss=result.eval_loss,
                           final_losses=result.last_losses)
            rows += distill_rows(s, figures, "MSP" if teacher.cfg.family == "lattice" else "MLM")
        elif s.method == "theseus":
            from kompakt.compress.theseus import train_theseus

            work = work_root / s.name
            work.mkdir(parents=True, exist_ok=True)
            out = train_theseus(s, teacher, tokenizer_stage, work, stop=stop, extra_state={"recipe": recipe_name})
            result = finish_training(s.name, out, tmp, tokenizer_stage, has_head, env.is_main)
            figures = {k: out[k] for k in ("num_params", "mlm_before", "mlm_after", "mlm_teacher")}
            figures.update(steps=result.step, tokens_seen=result.tokens_seen, eval_loss=result.eval_loss)
            rows += [("module replacing", f"{teacher.cfg.num_layers} -> {s.num_layers} layers; rate {s.replace_rate} "
                                          f"+ {s.rate_slope}/step, {s.successor_steps} successor-only steps"),
                     ("training", f"{result.step:,} steps, {result.tokens_seen:,} tokens"),
                     ("held-out MLM loss", f"successor {fmt_loss(out['mlm_after'])} (at the start "
                                           f"{fmt_loss(out['mlm_before'])}, teacher {fmt_loss(out['mlm_teacher'])})")]
        elif env.is_main and s.method == "layer_drop":
            from kompakt.compress.layerdrop import drop_layers

            tmp.mkdir(parents=True)
            figures = drop_layers(source, tmp, strategy=s.strategy, num_drop=s.num_drop, batches=heldout)
            rows.append(("layers dropped", f"{s.strategy}: {figures['dropped_layers']} (0-based), kept "
                                           f"{figures['kept_layers']}"))
        elif env.is_main and s.method == "prune":
            from kompakt.compress.prune import prune

            tmp.mkdir(parents=True)
            figures = prune(source, tmp, heads_fraction=s.heads_fraction, ffn_fraction=s.ffn_fraction,
                            batches=heldout, importance=s.importance)
            rows += prune_rows(figures)
        elif env.is_main and s.method == "quantize":
            from kompakt.compress.quantize import quantize

            tmp.mkdir(parents=True)
            figures = quantize(source, tmp, backend=s.backend, batches=heldout)
            rows += quantize_rows(figures)
        if env.is_main:
            runtime = "ort-int8" if s.method == "quantize" and s.backend == "onnx" else (
                "torch-int8" if s.method == "quantize" else "torch-fp32")
            speed = measure_speed(teacher_dir, tmp, runtime) if cfg.measure_speed else None
            figures["speed"] = speed
            figures["disk_bytes"] = disk_bytes(tmp)
            card = student_card(s.name, s.method, teacher_dir, teacher_label, tmp, rows, speed, release, recipe_name,
                                params_from=source if s.method == "quantize" else None)
            (tmp / "README.md").write_text(card, encoding="utf-8")
            write_json_atomic(tmp / STUDENT_INFO, {"name": s.name, "method": s.method, "figures": _plain(figures)})
            test_hook("before_student_rename")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            made[s.name] = json.loads((final / STUDENT_INFO).read_text())
            info(f"compress: {s.name} -> {final}")
        dist.barrier()
        if dist.any_true(stop.requested):
            _requeue(f"stopped by a signal after {s.name} was written")

    if env.is_main:
        summary = [(n, m["method"], (m["figures"].get("speed") or {}).get("speedup"), m["figures"].get("disk_bytes"))
                   for n, m in made.items()]
        table("compress", ["student", "method", "speedup", "bytes"],
              [(n, m, f"{x:.2f}x" if x else "-", f"{b / 1e6:.1f} MB" if b else "-") for n, m, x, b in summary])
        write_json_atomic(stage_dir / "manifest.json", {
            "stage": "compress", "hash": stage_hash, "inputs": inputs, "config": cfg.model_dump(mode="json"),
            "teacher": teacher_label, "students": made, "versions": package_versions(), "host": platform.node(),
            "argv": sys.argv, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "timings": {"total_s": round(time.perf_counter() - t0, 2)}, "complete": True})
    dist.barrier()
    return stage_dir


def _plain(obj):
    """Figures as JSON: tensors and numpy numbers to Python numbers, paths to strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def fmt_loss(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "not measured"


def distill_rows(s, f: dict, objective: str = "MLM") -> list[tuple[str, str]]:
    """The card's rows for a distilled student; `objective` names the held-out loss (a Lattice-BERT's is
    masked segment prediction, "MSP")."""
    fmt = fmt_loss

    losses = ", ".join(f"{k} {v:g}" for k, v in s.losses.model_dump().items() if v)
    cache = f["cache"]
    rows = [("distillation", f"{losses}; layer map {f['mapping']} (student layer i <- teacher layer); "
                             f"temperature {s.temperature}; init {f['init']}"),
            ("training", f"{f['steps']:,} steps, {f['tokens_seen']:,} tokens, {s.optim.name} lr {s.optim.lr}"),
            (f"held-out {objective} loss",
             f"student {fmt(f['mlm_after'])} (untrained {fmt(f['mlm_before'])}, teacher {fmt(f['mlm_teacher'])})")]
    if cache["enabled"]:
        rows.append(("teacher outputs", f"{cache['hits']:,} micro-batches read from the cache, "
                                        f"{cache['teacher_forwards']:,} computed"))
    return rows


def finish_training(name: str, out: dict, tmp: Path, tokenizer_stage: Path, has_head: bool, is_main: bool):
    """A trained student: requeue when its loop stopped early (signal, time limit), else export it to `tmp`."""
    result = out["result"]
    if result.stopped != "done":
        where = f"saved {result.checkpoint}" if result.checkpoint else "nothing new to save"
        _requeue(f"{name} stopped by {result.stopped} at step {result.step:,}; {where}")
    if is_main:
        export_student(out["model"], tmp, tokenizer_stage / "tokenizer", has_head)
    return result


def export_student(model: torch.nn.Module, out: Path, tokenizer_dir: Path, has_head: bool) -> None:
    """The student as a stock HF folder (the family's exporter), into `out` (a temporary name)."""
    from kompakt import families

    exporter = families.get(model.cfg.family).resolve("export")
    kwargs = {} if has_head else {"head": "base"}
    exporter(model.eval(), out, tokenizer_dir=tokenizer_dir, **kwargs)


def heldout_hf_batches(tokenizer_stage: Path, max_examples: int) -> list[dict]:
    """Padded batches of held-out examples ([CLS] ... [SEP], up to 128 tokens) for scores, agreement and speed."""
    from kompakt.packed import build_examples
    from kompakt.shards import TokenShards
    from kompakt.tokenizer import SpecialIds, load_tokenizer

    from kompakt.compress.batches import shard_batches

    specials = SpecialIds.from_tokenizer(load_tokenizer(tokenizer_stage / "tokenizer"))
    folder = tokenizer_stage / "heldout"
    shards = TokenShards(folder if (folder / "index.json").is_file() else tokenizer_stage / "tokens")
    examples = build_examples(shards, 126)
    return shard_batches(shards, examples, cls_id=specials.cls, sep_id=specials.sep, pad_id=specials.pad,
                         max_examples=max_examples)
