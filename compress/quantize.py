"""Post-training dynamic int8 quantization of a Hugging Face encoder folder, checked against fp32.

Two backends, each measured against fp32 in its own runtime:

- "torch": `torch.ao.quantization.quantize_dynamic` of every nn.Linear to qint8 (weights int8 per
  output channel, activations quantized per batch at run time), engine "x86". A dynamically quantized torch
  model has packed-weight modules that `save_pretrained` cannot write and `from_pretrained` cannot read,
  so the output folder is the fp32 folder plus `quantization.json`; `load_torch_int8(folder)` returns
  the quantized stock model (a second or two of quantizing at load).
- "onnx": the stock `AutoModel` encoder exported to `model.onnx` (fp32, inputs input_ids /
  attention_mask / token_type_ids with dynamic batch and sequence axes, output last_hidden_state),
  BERT fusions from onnxruntime.transformers.optimizer when `optimize`, then ONNX Runtime dynamic int8
  (QInt8 weights per channel) in `model_int8.onnx`. Any ONNX Runtime session loads either file.

Both check agreement with the fp32 torch model on the caller's batches (max abs difference of
last_hidden_state at real positions, cosine of mean-pooled embeddings, nearest-neighbour agreement,
and argmax agreement of the MLM or classification head when the folder has one) and measure int8
against fp32 throughput on the same batches. Without VNNI (`avx512_vnni`/`avx_vnni`), x86 int8 GEMMs
gain far less than the 2-4x of VNNI machines; the returned `note` states what was measured, never more.

Every file is written to a temporary name and renamed; `quantization.json` is written last, so a
folder without it is an interrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import torch

from kompakt.compress import speed
from kompakt.errors import ConfigError, DataError
from kompakt.hf import TOKENIZER_FILES
from kompakt.onnx_export import (  # noqa: F401 - load_encoder re-exported for compress.speed and the tests
    export_onnx, load_encoder, load_stock, ort_int8, require_onnx, tmp_name)
from kompakt.runs import write_json_atomic

BACKENDS = ("torch", "onnx")
MANIFEST = "quantization.json"
# Measured on the shared 2-core AVX2 EPYC (12x768 BERT, batch 1, seq 128, 1 thread, medians of 12
# interleaved runs): x86 (which picks fbgemm or onednn per op) 268 ms, fbgemm 294 ms, onednn 286 ms
# (within the machine's noise of each other), qnnpack 1048 ms; fp32 541 ms.
TORCH_ENGINE = "x86"
# Config files copied into both kinds of output folder, with kompakt.hf.TOKENIZER_FILES (whichever the source has).
CONFIG_FILES = ("config.json", "generation_config.json")
# Fraction of real (non-special) positions replaced by [MASK] for the masked-prediction agreement.
MASK_RATE = 0.15


# ---------------------------------------------------------------------------------------------- loading

def _check_folder(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: no config.json; give a Hugging Face model folder")
    if not any(model_dir.glob("*.safetensors")):
        raise DataError(f"{model_dir}: no model.safetensors; export the checkpoint with `kompakt export` first")


def _head_kind(model_dir: Path) -> str | None:
    """"mlm", "cls" or None, from the folder's config.json `architectures`."""
    archs = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    for a in archs:
        if a.endswith(("ForMaskedLM", "ForPreTraining")):
            return "mlm"
        if a.endswith("ForSequenceClassification"):
            return "cls"
    return None


def load_fp32(model_dir: str | Path) -> torch.nn.Module:
    """The folder's model with its head when it has one (AutoModelForMaskedLM / ...SequenceClassification),
    else the encoder; fp32, eval mode, sdpa attention."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    model_dir = Path(model_dir)
    heads = {"mlm": AutoModelForMaskedLM, "cls": AutoModelForSequenceClassification}
    cls = heads.get(_head_kind(model_dir), AutoModel)
    return load_stock(cls, model_dir, attn_implementation="sdpa")


def _torch_quantize_dynamic():
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise ConfigError(f"quantize backend 'torch' needs torch.ao.quantization.quantize_dynamic, which "
                          f"torch {torch.__version__} lacks; use backend 'onnx' (pip install onnxruntime onnx)"
                          ) from None
    return quantize_dynamic


def dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every nn.Linear dynamically quantized to qint8 (engine `TORCH_ENGINE`).

    Weights per output channel: on all-MiniLM-L6-v2 over 256 demo documents, mean-pooled embeddings
    had cosine 0.970 (min 0.944) to fp32 against 0.910 (min 0.832) per tensor, at the same latency.
    Embeddings and LayerNorms stay fp32: a gather and a normalisation per token are a small share of
    the time, and int8 embeddings cost accuracy without speed.
    """
    quantize_dynamic = _torch_quantize_dynamic()
    from torch.ao.quantization import per_channel_dynamic_qconfig

    if TORCH_ENGINE in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = TORCH_ENGINE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice, printed once per call
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                inplace=False)


def load_torch_int8(folder: str | Path) -> torch.nn.Module:
    """The stock HF model (with its head) of a quantize(backend="torch") folder, quantized as its
    quantization.json says."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"{folder}: no readable {MANIFEST}; it is not a finished quantize(backend='torch') "
                        "folder") from None
    if manifest.get("format") != "torch-dynamic-int8":
        raise DataError(f"{folder}: {MANIFEST} has format {manifest.get('format')!r}, not 'torch-dynamic-int8'")
    return dynamic_int8(load_fp32(folder))


# ------------------------------------------------------------------------------------------- file output

def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = tmp_name(dst)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _copy_folder_files(model_dir: Path, out_dir: Path, *, weights: bool) -> list[str]:
    """Config and tokenizer files (and the safetensors weights when `weights`) into out_dir; names copied."""
    names = [n for n in CONFIG_FILES + TOKENIZER_FILES if (model_dir / n).is_file()]
    if weights:
        names += sorted(p.name for p in model_dir.iterdir()
                        if p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json")
    for n in names:
        _copy_atomic(model_dir / n, out_dir / n)
    return names


# ------------------------------------------------------------------------------------------- agreement

def _pool(base: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    pooler = getattr(base, "pooler", None)
    if pooler is None:
        return None
    if isinstance(pooler, torch.nn.Linear):  # ALBERT: Linear on [CLS], then tanh
        return base.pooler_activation(pooler(hidden[:, 0]))
    return pooler(hidden)


def _head_logits(head_model: torch.nn.Module, batch: dict, hidden: torch.Tensor) -> torch.Tensor:
    """The fp32 head's logits on top of given encoder hidden states (e.g. ONNX Runtime's).

    A forward hook replaces the encoder's output; the head then runs exactly as in the stock model.
    """
    base = head_model.base_model

    def hook(module, args, kwargs, output):
        output.last_hidden_state = hidden
        if getattr(output, "pooler_output", None) is not None:
            output.pooler_output = _pool(base, hidden)
        return output

    handle = base.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            return head_model(**batch).logits
    finally:
        handle.remove()


def _forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(last_hidden_state, logits or None) of a torch model with or without a head."""
    import inspect

    params = inspect.signature(model.forward).parameters
    kw = {k: v for k, v in batch.items() if k in params}
    with torch.inference_mode():
        out = model(**kw, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    hidden = out.hidden_states[-1] if hidden is None else hidden
    return hidden, getattr(out, "logits", None)


def _masked(batch: dict, mask_id: int, special_ids: set[int], g: torch.Generator) -> tuple[dict, torch.Tensor]:
    ids = batch["input_ids"]
    real = batch["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(sorted(special_ids), dtype=ids.dtype))
    chosen = (torch.rand(ids.shape, generator=g) < MASK_RATE) & real
    return {**batch, "input_ids": ids.masked_fill(chosen, mask_id)}, chosen


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _agreement(ref_model: torch.nn.Module, int8_hidden_and_logits, batches: Sequence[dict], kind: str | None,
               model_dir: Path) -> dict:
    """Agreement of int8 with the fp32 torch model on `batches` (and on masked copies for an MLM head).

    `int8_hidden_and_logits(batch) -> (hidden, logits or None)`.
    """
    max_abs, ref_emb, q_emb = 0.0, [], []
    same, total = 0, 0
    for b in batches:
        h_ref, l_ref = _forward(ref_model, b)
        h_q, l_q = int8_hidden_and_logits(b)
        real = b["attention_mask"].bool()
        max_abs = max(max_abs, float((h_ref - h_q).abs()[real].max()))
        ref_emb.append(_mean_pool(h_ref, b["attention_mask"]))
        q_emb.append(_mean_pool(h_q, b["attention_mask"]))
        if kind == "mlm" and l_ref is not None:
            same += int((l_ref.argmax(-1) == l_q.argmax(-1))[real].sum())
            total += int(real.sum())
        elif kind == "cls" and l_ref is not None:
            same += int((l_ref.argmax(-1) == l_q.argmax(-1)).sum())
            total += len(l_ref)
    a, q = torch.cat(ref_emb), torch.cat(q_emb)
    cos = torch.nn.functional.cosine_similarity(a, q, dim=-1)
    out = {"max_abs_diff": max_abs, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
           "num_sequences": len(a), "nn_agreement": _nn_agreement(a, q)}
    if total:
        out["argmax_agreement"] = same / total
        out["argmax_positions" if kind == "mlm" else "argmax_sequences"] = total
    if kind == "mlm":
        out.update(_masked_agreement(ref_model, int8_hidden_and_logits, batches, model_dir))
    return out


def _nn_agreement(a: torch.Tensor, q: torch.Tensor) -> float | None:
    """Share of sequences whose nearest other sequence (cosine of mean-pooled embeddings) is the same in
    fp32 and int8: what a retrieval or dedup user of the embeddings sees."""
    if len(a) < 3:
        return None

    def nn_index(x):
        x = torch.nn.functional.normalize(x, dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    return float((nn_index(a) == nn_index(q)).float().mean())


def _masked_agreement(ref_model, int8_fn, batches, model_dir: Path) -> dict:
    """Argmax agreement at 15% [MASK]ed real positions: the MLM's actual task, harder than copying the input."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        return {}
    if tok.mask_token_id is None:
        return {}
    g = torch.Generator().manual_seed(0)
    same = total = 0
    for b in batches:
        mb, chosen = _masked(b, tok.mask_token_id, set(tok.all_special_ids), g)
        if not chosen.any():
            continue
        _, l_ref = _forward(ref_model, mb)
        _, l_q = int8_fn(mb)
        same += int((l_ref.argmax(-1) == l_q.argmax(-1))[chosen].sum())
        total += int(chosen.sum())
    return {"masked_argmax_agreement": same / total, "masked_positions": total} if total else {}


# ---------------------------------------------------------------------------------------------- quantize

def quantize(model_dir: Path, out_dir: Path, *, backend: str, batches: list[dict], optimize: bool = True,
             speed_repeats: int = 3) -> dict:
    """Dynamic int8 of the HF folder `model_dir` into `out_dir` (a fresh folder the caller renames after).

    `batches`: padded (B, L) batches of held-out text (`kompakt.compress.batches.text_batches`), used
    for the agreement check and the speed comparison (`speed_repeats` interleaved rounds). `optimize`
    applies ORT's BERT fusions to the ONNX graph (backend "onnx" only).

    Returns: backend, format, files, load (how to load the result), saveable_as_hf, agreement (see the
    module docstring; for "onnx" also `onnx_fp32_max_abs_diff`), speed (sequences/s of fp32 and int8,
    threads), speedup_over_fp32 (int8 over fp32 throughput, measured), vnni, cpu, note, size_bytes.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown quantize backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "onnx":
        require_onnx("quantize backend 'onnx'")
    else:
        _torch_quantize_dynamic()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_folder(model_dir)
    if not batches:
        raise DataError(f"quantize {model_dir}: no batches of held-out text to check agreement and speed on")
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = _head_kind(model_dir)
    ref = load_fp32(model_dir)
    if backend == "torch":
        info = _quantize_torch(model_dir, out_dir, ref, kind, batches, speed_repeats)
    else:
        info = _quantize_onnx(model_dir, out_dir, ref, kind, batches, optimize, speed_repeats)
    vnni = speed.has_vnni()
    runtime = "PyTorch" if backend == "torch" else "ONNX Runtime"
    x = info["speedup_over_fp32"]
    info.update({
        "backend": backend, "head": kind, "vnni": vnni, "cpu": speed.cpu_name(),
        "note": (f"int8 {'with' if vnni else 'without'} VNNI: measured {x:.2f}x over fp32 in {runtime} on "
                 f"{speed.cpu_name()} ({info['speed']['threads']} threads, {info['speed']['sequences']} sequences "
                 f"of held-out text)"),
    })
    info["files"] = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith(".")) + [MANIFEST]
    # Last: a folder without quantization.json is one whose writing was interrupted.
    write_json_atomic(out_dir / MANIFEST, info)
    return info


def _speed(runners: dict, batches: Sequence[dict], repeats: int) -> tuple[dict, float]:
    rates = speed.compare_throughput(runners, batches, repeats=repeats)
    fp32, int8 = rates["fp32"], rates["int8"]
    return ({"fp32_seq_per_s": fp32, "int8_seq_per_s": int8, "threads": torch.get_num_threads(),
             "sequences": sum(int(b["input_ids"].shape[0]) for b in batches), "rounds": repeats},
            int8 / fp32)


def _state_bytes(model: torch.nn.Module) -> int:
    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def _quantize_torch(model_dir, out_dir, ref, kind, batches, speed_repeats) -> dict:
    copied = _copy_folder_files(model_dir, out_dir, weights=True)
    qmodel = dynamic_int8(ref)
    agreement = _agreement(ref, lambda b: _forward(qmodel, b), batches, kind, model_dir)
    runners = {"fp32": speed.TorchRunner(ref.base_model, "torch-fp32", ref.config.vocab_size),
               "int8": speed.TorchRunner(qmodel.base_model, "torch-int8", ref.config.vocab_size)}
    speed_info, x = _speed(runners, batches, speed_repeats)
    return {
        "format": "torch-dynamic-int8", "engine": TORCH_ENGINE, "dtype": "qint8", "weights": "per channel",
        "modules": ["torch.nn.Linear"],
        "copied": copied, "saveable_as_hf": False,
        "load": "kompakt.compress.quantize.load_torch_int8(folder)",
        "why_not_hf": ("dynamically quantized torch modules hold packed int8 weights that save_pretrained cannot "
                       "write; the folder keeps the fp32 weights and quantizes them at load (deterministic)"),
        "agreement": agreement, "speed": speed_info, "speedup_over_fp32": x,
        "size_bytes": {"fp32": _state_bytes(ref.base_model), "int8": _state_bytes(qmodel.base_model)},
    }


def _quantize_onnx(model_dir, out_dir, ref, kind, batches, optimize, speed_repeats) -> dict:
    copied = _copy_folder_files(model_dir, out_dir, weights=False)
    export = export_onnx(model_dir, out_dir / speed.ONNX_FP32, optimize=optimize)
    fp32_sess = speed.OrtRunner(out_dir / speed.ONNX_FP32, "ort-fp32", ref.config.vocab_size)
    # fp32 ONNX against fp32 torch first: a wrong export would make every int8 figure meaningless.
    # The bound is 1e-4 relative to the largest activation (at least 1e-4 absolute): fp32 kernels sum in
    # different orders, and trained encoders have hidden values of 10-20 in a few dimensions.
    fp32_diff, scale = 0.0, 1.0
    for b in batches:
        h_ref, _ = _forward(ref, b)
        h = torch.from_numpy(fp32_sess(b))
        real = b["attention_mask"].bool()
        fp32_diff = max(fp32_diff, float((h - h_ref).abs()[real].max()))
        scale = max(scale, float(h_ref.abs()[real].max()))
    if fp32_diff > 1e-4 * scale:
        raise RuntimeError(f"{model_dir}: the fp32 ONNX export differs from torch by {fp32_diff:.3g} "
                           f"(allowed {1e-4 * scale:.3g}); not quantizing a wrong graph")
    quant = ort_int8(out_dir / speed.ONNX_FP32, out_dir / speed.ONNX_INT8)
    int8_sess = speed.OrtRunner(out_dir / speed.ONNX_INT8, "ort-int8", ref.config.vocab_size)

    def int8_fn(b):
        h = torch.from_numpy(int8_sess(b))
        if kind is None:
            return h, None
        return h, _head_logits(ref, {k: v for k, v in b.items()}, h)

    agreement = _agreement(ref, int8_fn, batches, kind, model_dir)
    agreement["onnx_fp32_max_abs_diff"] = fp32_diff
    speed_info, x = _speed({"fp32": fp32_sess, "int8": int8_sess}, batches, speed_repeats)
    return {
        "format": "onnx-dynamic-int8", "fp32_file": speed.ONNX_FP32, "int8_file": speed.ONNX_INT8,
        "export": export, "quantization": quant, "copied": copied, "saveable_as_hf": False,
        "load": "onnxruntime.InferenceSession(folder / 'model_int8.onnx'); tokenizer from the folder",
        "heads": ("the graph is the encoder (last_hidden_state); head agreement runs the fp32 torch head on "
                  "ONNX Runtime's hidden states") if kind else None,
        "agreement": agreement, "speed": speed_info, "speedup_over_fp32": x,
        "size_bytes": {"fp32": (out_dir / speed.ONNX_FP32).stat().st_size,
                       "int8": (out_dir / speed.ONNX_INT8).stat().st_size},
    }
