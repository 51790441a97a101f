"""ModernBERT: our packed model against the stock `transformers` classes in fp32, local and global layers,
documents of several lengths (some longer than the local window) packed into one batch."""

from __future__ import annotations

import pytest
import torch

from kompakt.model_config import ModelConfig
from kompakt.models.modernbert import ModernBertForMaskedLM, ModernBertModel, layer_is_global

LENGTHS = [30, 7, 19, 3, 12]


def tiny(**kw) -> ModelConfig:
    # 5 layers, global at 0 and 3; a window of 4 on each side, shorter than three of the documents.
    fields = dict(family="modernbert", vocab_size=128, hidden_size=32, num_layers=5, num_heads=2,
                  intermediate_size=48, max_position_embeddings=64, layer_norm_eps=1e-5,
                  modernbert={"local_attention": 8, "global_attn_every_n_layers": 3})
    return ModelConfig(**{**fields, **kw})


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(5, 128, (n,), generator=g) for n in LENGTHS]
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32)
    L = max(LENGTHS)
    padded = torch.zeros(len(docs), L, dtype=torch.long)
    mask = torch.zeros(len(docs), L, dtype=torch.long)
    for b, d in enumerate(docs):
        padded[b, :len(d)], mask[b, :len(d)] = d, 1
    return torch.cat(docs), cu, padded, mask


def unpad(x_BLD: torch.Tensor) -> torch.Tensor:
    return torch.cat([x_BLD[b, :n] for b, n in enumerate(LENGTHS)])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["rows", "padded", "mask", "flex"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hidden_states_and_mlm_logits_match_the_stock_model(backend, impl):
    from kompakt.hf_modernbert import to_hf_model

    torch.manual_seed(0)
    ours = ModernBertForMaskedLM(tiny(attention=backend)).eval()
    assert [layer_is_global(ours.cfg, i) for i in range(5)] == [True, False, False, True, False]
    stock = to_hf_model(ours)
    stock.config._attn_implementation = impl
    ids, cu, padded, mask = batch()
    positions = torch.tensor([0, 5, 29, 31, 40, 55, 58, 70])
    with torch.no_grad():
        hidden = ours.model(ids, cu)
        logits = ours(ids, cu, positions)["mlm_logits"]
        ref = stock(input_ids=padded, attention_mask=mask)
    with torch.no_grad():
        ref_hidden = unpad(stock.model(input_ids=padded, attention_mask=mask).last_hidden_state)
    torch.testing.assert_close(hidden, ref_hidden, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(logits, unpad(ref.logits)[positions], atol=2e-5, rtol=1e-4)


def test_the_local_window_matters_so_the_parity_test_can_fail():
    """A model whose local layers saw everything would differ from the stock one: the window is real."""
    from kompakt.hf_modernbert import to_hf_model

    torch.manual_seed(0)
    ours = ModernBertModel(tiny()).eval()
    wide = ModernBertModel(tiny(modernbert={"local_attention": 128, "global_attn_every_n_layers": 3})).eval()
    wide.load_state_dict(ours.state_dict())
    ids, cu, padded, mask = batch()
    with torch.no_grad():
        a, b = ours(ids, cu), wide(ids, cu)
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(a[cu[3]:cu[4]], b[cu[3]:cu[4]], atol=1e-5)  # a 3-token document fits any window
    assert to_hf_model(ours, head="base").config.sliding_window == 4


def test_export_loads_with_auto_classes_and_back(tmp_path):
    from transformers import AutoConfig, AutoModelForMaskedLM

    from kompakt import families

    torch.manual_seed(0)
    ours = ModernBertForMaskedLM(tiny()).eval()
    out = families.get("modernbert").resolve("export")(ours, tmp_path / "export")
    assert AutoConfig.from_pretrained(out).model_type == "modernbert"
    stock = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(stock).__name__ == "ModernBertForMaskedLM"
    back = families.get("modernbert").resolve("load")(out).eval()
    ids, cu, padded, mask = batch(1)
    positions = torch.tensor([1, 2, 33, 60])
    with torch.no_grad():
        torch.testing.assert_close(back(ids, cu, positions)["mlm_logits"], ours(ids, cu, positions)["mlm_logits"])
        torch.testing.assert_close(unpad(stock(input_ids=padded, attention_mask=mask).logits)[positions],
                                   ours(ids, cu, positions)["mlm_logits"], atol=2e-5, rtol=1e-4)


def test_any_layer_type_list_round_trips_and_matches_the_stock_model(tmp_path):
    """A stock folder whose layer_types are no every-n pattern (what layer dropping writes: local, global, local,
    local, global) loads into our model with that list, computes what the stock model computes, and exports back."""
    from transformers import AutoModelForMaskedLM

    from kompakt import families
    from kompakt.hf_modernbert import to_hf_model

    types = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    ours = ModernBertForMaskedLM(tiny(modernbert={"local_attention": 8, "layer_types": types})).eval()
    assert [layer_is_global(ours.cfg, i) for i in range(5)] == [False, True, False, False, True]
    folder = families.get("modernbert").resolve("export")(ours, tmp_path / "m")
    stock = AutoModelForMaskedLM.from_pretrained(folder).eval()
    assert stock.config.layer_types == types
    back = families.get("modernbert").resolve("load")(folder).eval()
    assert back.cfg.modernbert.layer_types == types
    ids, cu, padded, mask = batch(2)
    positions = torch.tensor([0, 4, 30, 50, 70])
    with torch.no_grad():
        want = unpad(stock(input_ids=padded, attention_mask=mask).logits)[positions]
        torch.testing.assert_close(back(ids, cu, positions)["mlm_logits"], want, atol=2e-5, rtol=1e-4)
        # The every-third pattern's model would differ: the list is what the layers run.
        pattern = ModernBertForMaskedLM(tiny()).eval()
        pattern.load_state_dict(ours.state_dict())
        assert not torch.allclose(pattern(ids, cu, positions)["mlm_logits"], want, atol=1e-4)
    assert to_hf_model(back).config.layer_types == types
    with pytest.raises(ValueError, match="layer_types has 2 entries for model.num_layers=5"):
        tiny(modernbert={"layer_types": types[:2]})
