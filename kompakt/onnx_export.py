"""ONNX export of a stock Hugging Face folder, for ONNX Runtime on CPU (the core; compress and infer use it).

- `export_onnx(folder, path, head=None)`: the folder's encoder (output `last_hidden_state`) or, with
  `head="classify"`/`"tokens"`, its stock `*ForSequenceClassification`/`*ForTokenClassification` model
  (output `logits`), fp32, inputs input_ids / attention_mask (/ token_type_ids) int64 (B, L) with dynamic
  axes, BERT fusions from onnxruntime.transformers when `optimize`.
- `ort_int8(fp32, int8)`: ONNX Runtime dynamic int8 (QInt8 weights per channel).
- `export_task_onnx(folder, head)`: both files into the folder beside the weights (`model.onnx`,
  `model_int8.onnx`), each checked against the torch model on the folder's own tokenizer, and `onnx.json`
  (what was exported, the measured differences) written last: a folder without it has no finished export.

Every file is written under a temporary name and renamed, so a kill leaves no half-written graph.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from kompakt.errors import ConfigError, DataError
from kompakt.runs import write_json_atomic

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
EXPORT_ATTENTION = "kompakt_onnx_export"
ONNX_OPSET = 17  # the TorchScript exporter's best-tested opset; LayerNormalization is a standard op from 17
FP32_FILE, INT8_FILE, MANIFEST = "model.onnx", "model_int8.onnx", "onnx.json"
HEADS = ("classify", "tokens")


def random_batch(vocab_size: int, *, batch_size: int = 1, seq_len: int = 128,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """`(batch_size, seq_len)` LongTensors: random token ids, attention mask all ones, token types 0.

    Ids are drawn above 999 when the vocabulary has more than 2000 entries: BERT vocabularies keep
    [PAD], [unusedN], [UNK], [CLS], [SEP] and [MASK] below 1000, and real text never consists of those.
    """
    low = 1000 if vocab_size > 2000 else min(5, vocab_size - 1)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def tmp_name(final: Path) -> Path:
    """A hidden temporary name beside `final`, unique to this process."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def load_stock(cls, model_dir: str | Path, **kw):
    """`cls.from_pretrained` in eval mode, quietly; a folder whose weights do not fit the class is a DataError.

    Loading the encoder of an MLM folder always reports the head's keys as unexpected and the pooler as
    missing (the encoder output used here does not go through the pooler); any other missing weight
    means the folder is not what its config.json says.
    """
    import transformers

    model_dir = Path(model_dir)

    # transformers 5 prints a progress bar and a load report per load; a quantize or bench run loads a dozen.
    bar = transformers.utils.logging.is_progress_bar_enabled()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, loading = cls.from_pretrained(str(model_dir), output_loading_info=True, **kw)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{model_dir}: stock transformers cannot load this folder ({first})") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        if bar:
            transformers.utils.logging.enable_progress_bar()
    missing = [k for k in loading.get("missing_keys", []) if not k.split(".")[0] == "pooler"
               and ".pooler." not in k]
    if missing:
        raise DataError(f"{model_dir}: model.safetensors lacks {len(missing)} weights of {cls.__name__} "
                        f"(e.g. {missing[0]}); re-export the folder")
    return model.eval()


def load_encoder(model_dir: str | Path, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The folder's encoder as stock `AutoModel` in fp32 eval mode (sdpa attention)."""
    from transformers import AutoModel

    return load_stock(AutoModel, model_dir, attn_implementation=attn_implementation)


@contextlib.contextmanager
def _quiet_logging():
    """Root logger at ERROR for a block: onnxruntime's fusion and quantization modules log through the root
    logger ("Please consider to run pre-processing", one line per unmatched pattern) at WARNING."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def require_onnx(what: str = "ONNX export") -> None:
    """ConfigError naming the package to install when onnx or onnxruntime is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError as err:
        pkg = (getattr(err, "name", None) or "onnxruntime").split(".")[0]
        raise ConfigError(f"{what} needs {pkg}: pip install onnxruntime onnx onnxscript") from None


def _export_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention written as BERT's original graph (MatMul, Div by sqrt(d), Add mask, Softmax, MatMul).

    transformers 5's eager attention multiplies by the scale instead of dividing; with a Mul beside the
    mask's Mul, onnxruntime's BERT attention fusion picks the wrong parent and fuses nothing. Same maths.
    """
    scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.size(-1))
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


class _EncoderForExport(torch.nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) -> last_hidden_state of a stock encoder, or the logits
    of a stock model with a task head (`output="logits"`).

    The additive mask is built here as (1 - mask) * float32 min on (B, 1, 1, L), the pattern ORT's
    fusion recognises; transformers passes a ready 4-D mask through unchanged. Stock transformers
    builds its mask with data-dependent Python branches that the tracer freezes to the example's
    shape, which made the traced graph wrong for other lengths (max difference 5.2 on MiniLM).
    """

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], output: str = "last_hidden_state"):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output = output

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        low = torch.finfo(torch.float32).min
        ext = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * low
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        window = getattr(self.model.config, "sliding_window", None)
        if self.model.config.model_type == "modernbert" and window is not None:
            # A ready 4-D mask would reach ModernBERT's local layers unchanged (no window): give each type its own,
            # the local one also masking keys more than `sliding_window` positions away (minimum, not a sum of two
            # float32 minima, which would be -inf and turn padded rows to NaN).
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            far = ((pos[:, None] - pos[None, :]).abs() > window).to(torch.float32) * low
            ext = {"full_attention": ext, "sliding_attention": torch.minimum(ext, far[None, None])}
        return getattr(self.model(input_ids=input_ids, attention_mask=ext, **kw), self.output)


def _ort_fuse(src: Path, dst: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """onnxruntime.transformers' BERT fusions (Attention, EmbedLayerNormalization, SkipLayerNormalization,
    BiasGelu) from src into dst; the fused-operator counts."""
    from onnxruntime.transformers import optimizer

    with _quiet_logging():
        opt = optimizer.optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                       opt_level=0)
    opt.save_model_to_file(str(dst))
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}


def _stock_class(head: str | None):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    if head not in (None, *HEADS):
        raise ConfigError(f"ONNX export head {head!r} is not one of {', '.join(HEADS)} (or none, for the encoder)")
    return {None: AutoModel, "classify": AutoModelForSequenceClassification,
            "tokens": AutoModelForTokenClassification}[head]


def export_onnx(model_dir: str | Path, onnx_path: str | Path, *, optimize: bool = True, head: str | None = None
                ) -> dict:
    """The folder's stock `AutoModel` encoder (or, with `head`, its task model) as an fp32 ONNX graph at
    `onnx_path` (written via a temp name).

    Inputs input_ids, attention_mask (and token_type_ids where the model takes them), int64 (B, L) with
    dynamic axes "batch" and "sequence"; output last_hidden_state float32 (B, L, H), or logits (B, C) for
    head "classify" and (B, L, C) for "tokens". The TorchScript
    exporter goes first: it takes 1-2 s for MiniLM where torch.export takes 10-15 s, and its graph is
    the one ORT's BERT fusions match. torch.export (dynamo) is the fallback. With `optimize` the
    BERT fusions are applied; where they fail the file stays unfused and sessions still optimise it at
    load (ORT_ENABLE_ALL). Returns what was done: exporter, fused operator counts, opset.

    On the 2-core AVX2 EPYC the fused graph measured no faster than the unfused one, whose session-level
    passes fuse much the same (batch 1 x 128, 1 thread: 4x312 fp32 22.9 vs 20.5 ms, int8 16.3 vs 15.4 ms;
    12x768 fp32 298 vs 280 ms; differences within this machine's noise). The fusion is kept so that the
    file is fused whatever session settings a deployment uses, and int8 gets the fused QAttention.
    """
    require_onnx()
    import inspect

    from transformers import AttentionInterface

    model_dir, onnx_path = Path(model_dir), Path(onnx_path)
    AttentionInterface.register(EXPORT_ATTENTION, _export_attention)
    model = load_stock(_stock_class(head), model_dir, attn_implementation=EXPORT_ATTENTION)
    params = inspect.signature(model.forward).parameters
    names = [n for n in INPUT_NAMES if n in params]
    output = "logits" if head else "last_hidden_state"
    wrapper = _EncoderForExport(model, names, output).eval()
    # Two rows of different lengths with padding, so no axis is specialised to 1 or to one length.
    example = random_batch(model.config.vocab_size, batch_size=2, seq_len=16, seed=0)
    example["attention_mask"][1, 9:] = 0
    args = tuple(example[n] for n in names)
    tmp = tmp_name(onnx_path)
    info = {"opset": ONNX_OPSET, "inputs": names, "outputs": [output], "head": head,
            "optimizer": "session ORT_ENABLE_ALL at load"}
    try:
        _export_graph(wrapper, args, names, tmp, info)
        if optimize:
            _fuse_in_place(tmp, model.config, info)
        os.replace(tmp, onnx_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info


def _export_graph(wrapper, args, names, tmp: Path, info: dict) -> None:
    output = wrapper.output
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, output]}
    if output == "logits" and info.get("head") == "classify":
        axes[output] = {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        try:
            torch.onnx.export(wrapper, args, str(tmp), input_names=names, output_names=[output],
                              dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)
            info["exporter"] = "torchscript"
        except Exception as err:  # noqa: BLE001 - any failure of the old exporter means: try the new one
            info["exporter"] = "dynamo"
            info["torchscript_error"] = str(err).splitlines()[0][:200]
            dims = {n: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for n in names}
            torch.onnx.export(wrapper, args, str(tmp), input_names=names, output_names=[output],
                              dynamic_shapes=dims, dynamo=True, external_data=False, verbose=False)


def _fuse_in_place(tmp: Path, config, info: dict) -> None:
    fused_tmp = tmp.with_name(tmp.name + ".fused")
    try:
        info["fused"] = _ort_fuse(tmp, fused_tmp, config.num_attention_heads, config.hidden_size)
        os.replace(fused_tmp, tmp)
        info["optimizer"] = "onnxruntime.transformers.optimizer (bert) + session ORT_ENABLE_ALL at load"
    except Exception as err:  # noqa: BLE001 - the fusions are an optimisation; the unfused graph is correct
        fused_tmp.unlink(missing_ok=True)
        info["optimizer_error"] = str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def ort_int8(fp32_path: str | Path, int8_path: str | Path, *, per_channel: bool = True) -> dict:
    """ONNX Runtime dynamic int8 of `fp32_path` into `int8_path`: int8 weights for the quantizer's default
    operators (MatMul with a constant weight, the fused Attention's QKV projection, EmbedLayerNormalization
    and Gather tables), uint8 activations quantized per call.

    Per-channel weights: on all-MiniLM-L6-v2 over 256 demo documents per-tensor weights gave mean-pooled
    cosine 0.935 (min 0.871) to fp32, per-channel 0.990 (min 0.983), at the same speed. 7-bit weights
    (reduce_range, against vpmaddubsw saturation on CPUs without VNNI) measured no better (0.990, min 0.982).
    """
    require_onnx()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8_path = Path(int8_path)
    tmp = tmp_name(int8_path)
    options = {
        # Shape inference cannot type the outputs of com.microsoft ops (Attention, SkipLayerNormalization)
        # that the BERT fusions introduce; they are float32 throughout.
        "DefaultTensorType": onnx.TensorProto.FLOAT,
        "MatMulConstBOnly": True,  # activation x activation matmuls (unfused attention) stay fp32
    }
    try:
        with warnings.catch_warnings(), _quiet_logging():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(fp32_path), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                             extra_options=options)
        os.replace(tmp, int8_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"weight_type": "QInt8", "per_channel": per_channel, "activations": "uint8, dynamic per call"}


# ------------------------------------------------------------------------------------- a task folder

def _check_batches(vocab_size: int, pad_id: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Three padded batches (rows of different lengths, 8 to 128 tokens) of ids above the special tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, (rows, width) in enumerate(((1, 8), (4, 37), (8, 128))):
        batch = random_batch(vocab_size, batch_size=rows, seq_len=width, seed=seed + k)
        lengths = torch.randint(max(2, width // 2), width + 1, (rows,), generator=g)
        lengths[0] = width
        batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, pad_id)
        out.append(batch)
    return out


def export_task_onnx(model_dir: str | Path, head: str | None = None, *, int8: bool = True,
                     optimize: bool = True) -> dict:
    """`model.onnx` (and `model_int8.onnx` when `int8`) of the folder's task model (or encoder when `head`
    is None) into the folder itself, then `onnx.json` last.

    Each graph is checked against the stock torch model in fp32 on three padded batches at real positions:
    the fp32 graph must agree within 1e-4 of the largest output magnitude (kernels sum in different orders),
    else nothing is kept and a RuntimeError says so; int8 reports its largest difference and, for a head, the
    argmax agreement with torch (int8 changes logits; the agreement says by how much it changes decisions).
    Returns the onnx.json record: files, head, output, max_abs_diff_fp32, int8 figures, export details.
    """
    require_onnx()
    import onnxruntime as ort

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: no config.json; give a Hugging Face model folder")
    ref = load_stock(_stock_class(head), model_dir, attn_implementation="sdpa")
    output = "logits" if head else "last_hidden_state"
    (model_dir / MANIFEST).unlink(missing_ok=True)  # an older record must not vouch for the new files
    export = export_onnx(model_dir, model_dir / FP32_FILE, optimize=optimize, head=head)
    pad = ref.config.pad_token_id if ref.config.pad_token_id is not None else 0
    batches = _check_batches(ref.config.vocab_size, pad)
    with torch.inference_mode():
        want = [getattr(ref(**{k: b[k] for k in export["inputs"]}), output).float() for b in batches]

    def run(path: Path) -> list[torch.Tensor]:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return [torch.from_numpy(sess.run([output], {k: b[k].numpy() for k in export["inputs"]})[0])
                for b in batches]

    def diff(got: list[torch.Tensor]) -> tuple[float, float]:
        worst, scale = 0.0, 1.0
        for b, g_, w in zip(batches, got, want):
            real = b["attention_mask"].bool() if head != "classify" else torch.ones(len(w), dtype=torch.bool)
            worst = max(worst, float((g_ - w).abs()[real].max()))
            scale = max(scale, float(w.abs()[real].max()))
        return worst, scale

    fp32_diff, scale = diff(run(model_dir / FP32_FILE))
    if fp32_diff > 1e-4 * scale:
        (model_dir / FP32_FILE).unlink(missing_ok=True)
        raise RuntimeError(f"{model_dir}: the fp32 ONNX export differs from torch by {fp32_diff:.3g} "
                           f"(allowed {1e-4 * scale:.3g}); no ONNX file kept")
    record = {"files": [FP32_FILE], "head": head, "output": output, "export": export,
              "max_abs_diff_fp32": fp32_diff, "largest_output": scale}
    if int8:
        record["quantization"] = ort_int8(model_dir / FP32_FILE, model_dir / INT8_FILE)
        got = run(model_dir / INT8_FILE)
        record["max_abs_diff_int8"] = diff(got)[0]
        if head:
            same = total = 0
            for b, g_, w in zip(batches, got, want):
                real = b["attention_mask"].bool() if head == "tokens" else torch.ones(len(w), dtype=torch.bool)
                same += int((g_.argmax(-1) == w.argmax(-1))[real].sum())
                total += int(real.sum())
            record["int8_argmax_agreement"] = same / total
        record["files"].append(INT8_FILE)
    record["files"].append(MANIFEST)
    write_json_atomic(model_dir / MANIFEST, record)  # last: its presence means both graphs are whole
    return record
