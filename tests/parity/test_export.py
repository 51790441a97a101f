"""Export round trips: our model -> stock HF folder -> Auto classes, no remote code, same outputs."""

import json

import pytest
import torch
from conftest import make_docs, packed_batch, padded_batch
from transformers import AutoModel, AutoModelForMaskedLM

from kompakt import hf
from kompakt.errors import KompaktError
from kompakt.model_config import ModelConfig
from kompakt.models import build_pretraining_model

TINY = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, embedding_size=32)


def randomise(model):
    """Non-zero biases and LayerNorms so a dropped or swapped tensor changes the outputs."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("family,model_type", [("bert", "bert"), ("albert", "albert"), ("spanbert", "bert")])
def test_round_trip(tmp_path, family, model_type):
    ours = randomise(build_pretraining_model(ModelConfig(family=family, **TINY)))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(f"[unused{i}]" for i in range(128)) + "\n")
    out = hf.export(ours, tmp_path / "export", tokenizer_dir=tok, model_card="# tiny\n")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and "auto_map" not in config
    assert (out / "model.safetensors").exists() and (out / "vocab.txt").exists()
    assert (out / "README.md").read_text() == "# tiny\n"
    assert not (tmp_path / "export.tmp").exists()

    mlm = AutoModelForMaskedLM.from_pretrained(out).eval()
    base = AutoModel.from_pretrained(out).eval()
    docs, types = make_docs(4, 128, seed=5)
    pb, b = padded_batch(docs, types), packed_batch(docs, types)
    real = pb["attention_mask"].bool()
    encoder = ours.albert if family == "albert" else ours.bert
    with torch.no_grad():
        mine = ours(**{k: v for k, v in b.items() if not k.startswith("sbo")},
                    **({"sbo_left": b["mlm_positions"] - 1, "sbo_right": b["mlm_positions"] + 1,
                        "sbo_rel": torch.zeros_like(b["mlm_positions"])} if family == "spanbert" else {}))
        x_TD = encoder(b["input_ids"], b["cu_seqlens"], b["max_seqlen"], token_type_ids=b["token_type_ids"])
        logits = mlm(**pb).logits[real][b["mlm_positions"]]
        hidden = base(**pb).last_hidden_state[real]
    torch.testing.assert_close(logits, mine["mlm_logits"])
    torch.testing.assert_close(hidden, x_TD)

    again = hf.load_pretrained(out)
    assert again.cfg.family == model_type
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, ours.state_dict()[k])


def test_spanbert_export_drops_sbo_head():
    ours = build_pretraining_model(ModelConfig(family="spanbert", **TINY))
    assert any(k.startswith("sbo.") for k in ours.state_dict())
    assert not any(k.startswith("sbo.") for k in hf.hf_state_dict(ours, "masked_lm"))


def test_pretraining_head_export_and_head_mismatch(tmp_path):
    ours = randomise(build_pretraining_model(ModelConfig(family="albert", **TINY)))
    out = hf.export(ours, tmp_path / "pt", head="pretraining")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["AlbertForPreTraining"]
    base = hf.export(ours, tmp_path / "base", head="base")
    assert "pooler.weight" in hf.load_pretrained(base).state_dict()
    mlm_only = build_pretraining_model(ModelConfig(family="bert", **TINY))
    with pytest.raises(KompaktError, match="head='pretraining'"):
        hf.export(mlm_only, tmp_path / "bad", head="pretraining")


def test_load_pretrained_errors(tmp_path):
    from kompakt.errors import DataError

    with pytest.raises(DataError, match="config.json"):
        hf.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf.to_hf_config(ModelConfig(**TINY)).to_dict()))
    with pytest.raises(DataError, match="model.safetensors"):
        hf.load_pretrained(tmp_path)


def test_hf_config_round_trip():
    albert_only = {"embedding_size", "num_hidden_groups", "inner_group_num"}
    for family in ("bert", "albert"):
        cfg = ModelConfig(family=family, num_hidden_groups=2, **{**TINY, "num_layers": 4})
        back = hf.from_hf_config(hf.to_hf_config(cfg))
        skip = {"hidden_act"} | (albert_only if family == "bert" else set())
        assert back.model_dump(exclude=skip) == cfg.model_dump(exclude=skip)
        assert back.act == cfg.act
