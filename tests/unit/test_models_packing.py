"""Packed attention: backends agree, positions restart, documents do not see each other, heads run on
masked rows only, and every family's pretraining model trains on a packed batch."""

import pytest
import torch

from kompakt.errors import ConfigError
from kompakt.model_config import ModelConfig, check_vocab
from kompakt.models import build_pretraining_model
from kompakt.models.packing import attend, plan_attention, position_ids_from_cu_seqlens

TINY = dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, embedding_size=16)


def cu(lengths):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return out


def test_position_ids_restart_per_sequence():
    assert position_ids_from_cu_seqlens(cu([3, 1, 2]), 6).tolist() == [0, 1, 2, 0, 0, 1]


@pytest.mark.parametrize("backend", ["padded", "rows"])
def test_grid_backends_equal_per_sequence_attention_with_grads(backend):
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3, 4]
    q, k, v = (torch.randn(sum(lengths), 2, 8, requires_grad=True) for _ in range(3))
    out = attend(q, k, v, plan_attention(cu(lengths), None, sum(lengths), backend))
    expected, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        qs, ks, vs = (x[s].transpose(0, 1) for x in (q, k, v))
        expected.append(torch.softmax(qs @ ks.transpose(1, 2) / 8 ** 0.5, -1).matmul(vs).transpose(0, 1))
        start += n
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected)
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    g_exp = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for a, b in zip(g_out, g_exp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["rows", "mask", "flex"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_backends_agree_with_padded(backend):
    torch.manual_seed(1)
    lengths = [7, 2, 12]
    q, k, v = (torch.randn(sum(lengths), 2, 16) for _ in range(3))
    ref = attend(q, k, v, plan_attention(cu(lengths), None, sum(lengths), "padded"))
    got = attend(q, k, v, plan_attention(cu(lengths), 12, sum(lengths), backend))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_auto_backend_on_cpu_is_rows():
    plan = plan_attention(cu([2, 3, 4, 1, 5]), 5, 15, "auto")
    assert plan.backend == "rows" and plan.num_rows == 3  # first-fit decreasing: 5 | 4+1 | 3+2
    assert sorted(plan.index_T.tolist()) == list(range(15))


@pytest.mark.parametrize("family", ["bert", "albert", "spanbert"])
def test_document_boundary_blocks_attention(family):
    """Changing every token of sequence 1 leaves sequence 0's and 2's hidden states unchanged."""
    torch.manual_seed(0)
    model = build_pretraining_model(ModelConfig(family=family, **TINY)).eval()
    encoder = model.albert if family == "albert" else model.bert
    lengths = [6, 4, 5]
    ids = torch.randint(5, 128, (15,))
    changed = ids.clone()
    changed[6:10] = (changed[6:10] + 7) % 128
    with torch.no_grad():
        a, b = encoder(ids, cu(lengths)), encoder(changed, cu(lengths))
    torch.testing.assert_close(a[:6], b[:6])
    torch.testing.assert_close(a[10:], b[10:])
    assert (a[6:10] - b[6:10]).abs().max() > 1e-3
    # The same document packed at a different offset gives the same states (positions restart).
    with torch.no_grad():
        alone = encoder(ids[10:], cu([5]))
    torch.testing.assert_close(alone, a[10:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_output_rows_are_exact(family):
    """The last layer on the head's rows only gives those rows of the full forward."""
    model = build_pretraining_model(ModelConfig(family=family, num_hidden_groups=2, inner_group_num=2,
                                                **{**TINY, "num_layers": 4})).eval()
    encoder = model.albert if family == "albert" else model.bert
    ids = torch.randint(5, 128, (20,))
    rows = torch.tensor([0, 7, 3, 19, 7])
    with torch.no_grad():
        full, part = encoder(ids, cu([12, 8])), encoder(ids, cu([12, 8]), output_rows=rows)
    torch.testing.assert_close(part, full[rows])


def spanbert_extras(positions):
    return {"sbo_left": positions - 1, "sbo_right": positions + 1, "sbo_rel": torch.zeros_like(positions)}


@pytest.mark.parametrize("family,expected", [("bert", {"mlm"}), ("albert", {"mlm", "sop"}),
                                             ("spanbert", {"mlm", "sbo"})])
def test_pretraining_forward_backward(family, expected):
    torch.manual_seed(0)
    model = build_pretraining_model(ModelConfig(family=family, **TINY))
    lengths = [9, 6, 11]
    ids = torch.randint(5, 128, (26,))
    positions = torch.tensor([2, 4, 10, 13, 20])
    batch = {"input_ids": ids, "cu_seqlens": cu(lengths), "max_seqlen": 11, "mlm_positions": positions,
             "mlm_labels": ids[positions], "token_type_ids": torch.zeros_like(ids)}
    if family == "albert":
        batch["sop_labels"] = torch.tensor([0, 1, 0])
    if family == "spanbert":
        batch.update(spanbert_extras(positions))
    out = model(**batch)
    assert set(out["losses"]) == expected and out["num_predictions"] == 5
    assert out["mlm_logits"].shape == (5, 128)
    torch.testing.assert_close(out["loss"], sum(out["losses"].values()))
    # Untrained model: each loss is near ln(V) = 4.85.
    assert all(3.5 < v.item() < 6.5 for k, v in out["losses"].items() if k != "sop")
    out["loss"].backward()
    emb = (model.albert if family == "albert" else model.bert).embeddings.word_embeddings.weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_head_runs_on_masked_rows_only():
    model = build_pretraining_model(ModelConfig(family="bert", **TINY))
    seen = []
    model.cls.predictions.transform.dense.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    ids = torch.randint(5, 128, (40,))
    model(input_ids=ids, cu_seqlens=cu([20, 20]), mlm_positions=torch.tensor([3, 25]), mlm_labels=ids[:2])
    assert seen == [2]


def test_spanbert_relative_positions_clip():
    model = build_pretraining_model(ModelConfig(family="spanbert", max_span_length=3, **TINY)).eval()
    left, right = torch.randn(1, 32).expand(2, 32), torch.randn(1, 32).expand(2, 32)
    with torch.no_grad():
        far = model.sbo(left, right, torch.tensor([2, 50]))
    torch.testing.assert_close(far[0], far[1])


def test_config_validation_and_vocab_check():
    with pytest.raises(ValueError, match="multiple of 64"):
        ModelConfig(vocab_size=1000)
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(hidden_size=100, num_heads=12)
    with pytest.raises(ValueError, match="extra"):
        ModelConfig(hiden_size=768)
    cfg = check_vocab(ModelConfig(), 8000, "tok/")
    assert cfg.vocab_size == 8000
    assert check_vocab(cfg, 8000, "tok/") is cfg
    with pytest.raises(ConfigError, match=r"model.vocab_size=8064 .* tok/tokenizer.json has 8000"):
        check_vocab(ModelConfig(vocab_size=8064), 8000, "tok/tokenizer.json")
    with pytest.raises(ConfigError, match="multiple of 64"):
        check_vocab(ModelConfig(), 8001, "tok/")
