"""Lattice-BERT export: packed model -> HF folder -> AutoModel after `kompakt.register_hf()`, same outputs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM

import kompakt

kompakt.register_hf()  # "lattice-bert" with the Auto classes
from kompakt import hf_lattice
from kompakt.errors import DataError
from kompakt.model_config import ModelConfig
from kompakt.models import build_pretraining_model
from kompakt.pretrain.lattice import Lexicon, build_lattice, collate_lattice, read_lexicon

CLS, SEP = 1, 2
SENTENCES = ("研究生命起源", "中国人民银行今天发布了新的研究报告")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def lattice_inputs():
    """Two lattices of different lengths with real jieba words; characters get ids from 5 upward."""
    chars = {c: 5 + i for i, c in enumerate(sorted(set("".join(SENTENCES))))}
    vocab_size = 64
    words = [w for w in read_lexicon("jieba", max_words=60000) if all(c in chars for c in w)]
    lexicon = Lexicon.from_words(words, chars, first_word_id=vocab_size, max_word_len=4)
    examples = [build_lattice([[chars[c] for c in s]], lexicon, cls_id=CLS, sep_id=SEP) for s in SENTENCES]
    assert all(len(ex) > ex.num_chars for ex in examples), "every sentence should match lexicon words"
    cfg = ModelConfig(family="lattice", vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=64,
                      lattice={"num_words": len(words), "max_word_len": 4, "max_relative_distance": 8})
    return cfg, examples


def padded(examples):
    L = max(len(ex) for ex in examples)
    batch = {k: torch.zeros(len(examples), L, dtype=torch.long)
             for k in ("input_ids", "attention_mask", "lattice_start", "lattice_end", "token_type_ids")}
    for i, ex in enumerate(examples):
        n = len(ex)
        batch["input_ids"][i, :n] = torch.from_numpy(ex.input_ids)
        batch["attention_mask"][i, :n] = 1
        batch["lattice_start"][i, :n] = torch.from_numpy(ex.lattice_start)
        batch["lattice_end"][i, :n] = torch.from_numpy(ex.lattice_end)
        batch["token_type_ids"][i, :n] = torch.from_numpy(ex.token_type_ids)
    return batch


def randomised(cfg):
    torch.manual_seed(0)
    model = build_pretraining_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@torch.no_grad()
def test_export_loads_with_auto_classes_and_matches_packed(tmp_path, lattice_inputs):
    cfg, examples = lattice_inputs
    ours = randomised(cfg)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "lexicon.txt").write_text("研究\t10\n", encoding="utf-8")
    out = hf_lattice.export(ours, tmp_path / "export", tokenizer_dir=tok)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lattice-bert" and "auto_map" not in config
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()
    assert (out / "lexicon.txt").exists() and "lattice_start" in (out / "README.md").read_text()

    # Packed reference: both sentences in one stream; masked positions spread over both.
    positions = [[1, 3, len(examples[0]) - 1], [2, len(examples[1]) - 1]]
    masks = [(ex.input_ids, np.array(p), ex.input_ids[p]) for ex, p in zip(examples, positions)]
    packed = collate_lattice(examples, masks)
    hidden_TD = ours.lattice_bert(packed["input_ids"], packed["cu_seqlens"], packed["lattice_start"],
                                  packed["lattice_end"], packed["max_seqlen"], packed["token_type_ids"])
    logits_MV = ours(**packed)["mlm_logits"]

    base = AutoModel.from_pretrained(out).eval()
    assert type(base).__name__ == "LatticeBertModel"
    batch = padded(examples)
    hidden = base(**batch).last_hidden_state
    n0, n1 = len(examples[0]), len(examples[1])
    assert n0 != n1
    torch.testing.assert_close(hidden[0, :n0], hidden_TD[:n0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden[1, :n1], hidden_TD[n0:], rtol=1e-5, atol=1e-5)
    assert hidden[0, n0:].abs().sum() == 0  # padding rows are zero

    mlm = AutoModelForMaskedLM.from_pretrained(out).eval()
    logits = mlm(**batch).logits
    rows = torch.cat([logits[i, p] for i, p in enumerate(positions)])
    torch.testing.assert_close(rows, logits_MV, rtol=1e-5, atol=1e-5)
    assert mlm.cls.predictions.decoder.weight is mlm.lattice_bert.get_input_embeddings().weight

    back = hf_lattice.load_pretrained(out)
    torch.testing.assert_close(back(**packed)["mlm_logits"], logits_MV, rtol=0, atol=0)


def test_export_needs_the_lexicon(tmp_path, lattice_inputs):
    cfg, _ = lattice_inputs
    with pytest.raises(DataError, match="lexicon.txt"):
        hf_lattice.export(randomised(cfg), tmp_path / "export", tokenizer_dir=tmp_path)
    assert not (tmp_path / "export").exists()


def test_fresh_process_loads_after_register_hf(tmp_path, lattice_inputs):
    cfg, _ = lattice_inputs
    out = hf_lattice.export(randomised(cfg), tmp_path / "export")
    code = ("import kompakt, sys\n"
            "assert 'transformers' not in sys.modules  # import kompakt stays cheap: no hook, no import\n"
            "kompakt.register_hf()\n"
            "from transformers import AutoModel\n"
            f"m = AutoModel.from_pretrained({str(out)!r})\n"
            "print(type(m).__name__)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("LatticeBertModel")
