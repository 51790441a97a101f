"""The pretrain stage on real demo text: a tiny BERT learns (held-out MLM loss falls), the stage
writes metrics, TensorBoard, checkpoints, manifest and an HF export that stock transformers loads,
and `kompakt export` turns a checkpoint into the same folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from kompakt.config import TokenizerConfig
from kompakt.model_config import ModelConfig
from kompakt.pretrain_config import PretrainConfig
from kompakt.runs import write_json_atomic
from kompakt.shards import ShardWriter, write_index


def build_tokenizer_stage(folder: Path, docs: list[str], vocab_size: int = 1024) -> Path:
    """A tokenizer stage directory (tokenizer/ + tokens/ + manifest.json) from real documents."""
    from kompakt.tokenization.pretokenize import encode_sentences, word_start_table
    from kompakt.tokenization.train import save_hf, train_tokenizer

    cfg = TokenizerConfig(kind="wordpiece", family="bert", vocab_size=vocab_size, min_frequency=2)
    tok = train_tokenizer(cfg, [docs[i:i + 500] for i in range(0, len(docs), 500)])
    save_hf(tok, cfg, folder / "tokenizer")
    table = word_start_table(tok)
    (folder / "tokens").mkdir(parents=True)
    writer = ShardWriter(folder / "tokens", 0, tok.get_vocab_size())
    for doc in docs:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", doc.replace("\n", " ")) if s.strip()]
        ids, starts, lengths = encode_sentences(tok, sentences, table)
        bounds = (np.cumsum(lengths) - lengths).tolist()
        writer.add_document([(ids[a:a + n], starts[a:a + n]) for a, n in zip(bounds, lengths.tolist())])
    write_index(folder / "tokens", [writer.close()], tok.get_vocab_size())
    write_json_atomic(folder / "manifest.json", {"stage": "tokenizer", "hash": "test", "complete": True})
    return folder


@pytest.fixture(scope="module")
def tokenizer_stage(tmp_path_factory, demo_docs) -> Path:
    return build_tokenizer_stage(tmp_path_factory.mktemp("tokenizer-test"), demo_docs[:3000])


TINY_MODEL = ModelConfig(family="bert", hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128,
                         max_position_embeddings=64)


def tiny_pretrain(**overrides) -> PretrainConfig:
    raw = {"max_steps": 120, "seed": 0, "save_every": 60, "keep_last": 2, "log_every": 20, "eval_every": 60,
           "eval_batches": 4,
           "objective": {"masking": "whole_word", "max_seq_len": 64},
           "data": {"tokens_per_micro_batch": 1024, "global_batch_tokens": 4096, "prefetch": 1},
           "optim": {"name": "adamw", "lr": 5e-3, "weight_decay": 0.01},
           "schedule": {"kind": "wsd", "warmup_steps": 10, "decay_fraction": 0.3}}
    raw.update(overrides)
    return PretrainConfig.model_validate(raw)


@pytest.mark.slow  # about 45 s on 2 loaded cores
@pytest.mark.distributed
def test_heldout_mlm_loss_falls_and_export_loads(tokenizer_stage, tmp_path):
    from kompakt.pretrain import stage

    out = tmp_path / "pretrain-test"
    stage.run(TINY_MODEL, tiny_pretrain(), tokenizer_stage, out, stage_hash="test", inputs={"tokenizer": "test"},
              recipe_name="test")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["counts"]["steps"] == 120
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r["eval_loss"] for r in rows if r["step"] == 0)
    end = manifest["eval_loss"]
    # Random init predicts about uniformly over 1,024 ids (ln 1024 = 6.9); 120 steps of 4k tokens
    # learn the frequent words and should take off well over a nat (1.65-1.72 measured; the WordPiece
    # vocabulary itself varies a little between trainings, so the margin matters).
    assert start > 6.0
    assert end < start - 1.5, f"held-out loss {start:.3f} -> {end:.3f}"
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["tokens_seen"] == manifest["counts"]["tokens_seen"]
    assert any((out / "tb").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000060", "step-00000120"]

    # The export: stock transformers loads it and its MLM predictions match the loss we report.
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    export = out / "export"
    card = (export / "README.md").read_text()
    assert "120" in card and "tokens seen" in card and "whole_word" in card
    # A published card names the data by counts and stage hash, never by this machine's paths.
    assert f"{manifest['counts']['tokens_seen']:,}" in card and "documents" in card
    assert str(tmp_path) not in card and str(tokenizer_stage) not in card
    hf_model = AutoModelForMaskedLM.from_pretrained(export).eval()
    hf_tok = AutoTokenizer.from_pretrained(export)
    enc = hf_tok("Han kjørte bilen til byen i går.", return_tensors="pt")
    with torch.no_grad():
        logits = hf_model(**enc).logits
    assert logits.shape[-1] == hf_model.config.vocab_size and torch.isfinite(logits).all()

    # `kompakt export` on the middle checkpoint gives a loadable folder too.
    from kompakt.cli import main

    assert main(["export", str(out / "checkpoints" / "step-00000060"), "--out", str(tmp_path / "mid")]) == 0
    mid = AutoModelForMaskedLM.from_pretrained(tmp_path / "mid")
    w_mid = mid.state_dict()["bert.embeddings.word_embeddings.weight"]
    w_end = hf_model.state_dict()["bert.embeddings.word_embeddings.weight"]
    assert w_mid.shape == w_end.shape and not torch.equal(w_mid, w_end)


def test_export_of_incomplete_checkpoint_is_a_clear_error(tmp_path, capsys):
    from kompakt.cli import main

    half = tmp_path / "checkpoints" / "step-00000005"
    half.mkdir(parents=True)
    assert main(["export", str(half)]) == 2
    assert "not a complete kompakt checkpoint" in capsys.readouterr().err


@pytest.mark.distributed
def test_modernbert_pretrains_unpadded_and_exports_to_the_stock_classes(tokenizer_stage, tmp_path):
    """The modernbert family through the same stage: held-out loss falls, the export is a stock
    ModernBertForMaskedLM whose predictions equal ours, and the stock task heads load it."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    from kompakt.pretrain import stage

    model = ModelConfig(family="modernbert", hidden_size=64, num_layers=3, num_heads=2, intermediate_size=96,
                        max_position_embeddings=64, layer_norm_eps=1e-5,
                        modernbert={"local_attention": 16, "global_attn_every_n_layers": 3})
    out = tmp_path / "pretrain-modernbert"
    stage.run(model, tiny_pretrain(max_steps=40, save_every=40, eval_every=40,
                                   objective={"masking": "token", "mask_rate": 0.3, "max_seq_len": 64}),
              tokenizer_stage, out, stage_hash="test", inputs={"tokenizer": "test"}, recipe_name="test")
    manifest = json.loads((out / "manifest.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r["eval_loss"] for r in rows if r["step"] == 0)
    assert manifest["eval_loss"] < start - 0.5, (start, manifest["eval_loss"])

    export = out / "export"
    hf_model = AutoModelForMaskedLM.from_pretrained(export).eval()
    assert type(hf_model).__name__ == "ModernBertForMaskedLM" and hf_model.config.layer_types == [
        "full_attention", "sliding_attention", "sliding_attention"]
    tok = AutoTokenizer.from_pretrained(export)
    enc = tok(["Han kjørte bilen til byen i går.", "Hun leste en bok."], padding=True, return_tensors="pt")
    assert "token_type_ids" not in enc
    with torch.no_grad():
        logits = hf_model(**enc).logits
    assert torch.isfinite(logits).all()
    clf = AutoModelForSequenceClassification.from_pretrained(export, num_labels=3)
    assert type(clf).__name__ == "ModernBertForSequenceClassification"
    assert clf(**enc).logits.shape == (2, 3)
