"""Lattice-BERT on packed batches (kompakt/models/lattice.py): boundaries, lattice bias, BERT reduction."""

import pytest
import torch

from kompakt.model_config import ModelConfig
from kompakt.models import build_pretraining_model
from kompakt.models.bert import BertModel
from kompakt.models.lattice import LatticeBertModel, LatticePositionBias

CLS, SEP = 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def config(**kw) -> ModelConfig:
    base = dict(family="lattice", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                intermediate_size=64,
                max_position_embeddings=64, lattice={"num_words": 20, "max_relative_distance": 4})
    return ModelConfig(**{**base, **kw})


def model(seed=0, **kw) -> LatticeBertModel:
    torch.manual_seed(seed)
    m = LatticeBertModel(config(**kw)).eval()
    # A larger bias than the N(0, 0.02) initialisation, so its effect is far above float noise.
    torch.nn.init.normal_(m.position_bias.embeddings.weight, std=1.0)
    return m


def packed(*seqs):
    """seqs: (ids, starts, ends) per sequence -> the packed keyword tensors."""
    ids, starts, ends, cu = [], [], [], [0]
    for i, s, e in seqs:
        ids += i
        starts += s
        ends += e
        cu.append(cu[-1] + len(i))
    return dict(input_ids=torch.tensor(ids), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                max_seqlen=max(len(s[0]) for s in seqs), lattice_start=torch.tensor(starts),
                lattice_end=torch.tensor(ends))


# [CLS] c c c c [SEP] + words (64 = first word id): spans (1,2), (2,4), (3,4).
SEQ_A = ([CLS, 10, 11, 12, 13, SEP, 64, 65, 66], [0, 1, 2, 3, 4, 5, 1, 2, 3], [0, 1, 2, 3, 4, 5, 2, 4, 4])
SEQ_B = ([CLS, 20, 21, SEP, 70], [0, 1, 2, 3, 1], [0, 1, 2, 3, 2])


@torch.no_grad()
def test_document_boundary_blocks_attention():
    m = model()
    out = m(**packed(SEQ_A, SEQ_B))
    changed_b = ([CLS, 30, 31, SEP, 71], SEQ_B[1], SEQ_B[2])
    out2 = m(**packed(SEQ_A, changed_b))
    torch.testing.assert_close(out2[:9], out[:9], rtol=0, atol=1e-6)
    assert (out2[9:] - out[9:]).abs().max() > 1e-3
    # Each sequence alone gives the same rows as inside the packed batch.
    torch.testing.assert_close(m(**packed(SEQ_B)), out[9:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(**packed(SEQ_A)), out[:9], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_rows_and_padded_grids_agree():
    rows = model()
    padded_model = LatticeBertModel(config(attention="padded")).eval()
    padded_model.load_state_dict(rows.state_dict())
    short = ([CLS, 7, SEP], [0, 1, 2], [0, 1, 2])
    batch = packed(SEQ_A, SEQ_B, short, SEQ_B)  # rows of 9 tokens: 9 | 5 + 3 | 5, three rows for four sequences
    torch.testing.assert_close(rows(**batch), padded_model(**batch), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_lattice_bias_depends_on_word_spans():
    m = model()
    base = m(**packed(SEQ_A))
    # Permute the words' end positions only: the absolute position embedding (from the start) is
    # unchanged, so any difference comes from the relative-distance bias.
    ids, starts, ends = SEQ_A
    permuted = (ids, starts, ends[:6] + [4, 2, 4])
    assert (m(**packed(permuted)) - base).abs().max() > 1e-3
    m.position_bias.embeddings.weight.zero_()
    torch.testing.assert_close(m(**packed(permuted)), m(**packed(SEQ_A)), rtol=0, atol=1e-6)


def test_bias_is_the_sum_of_four_clipped_distance_embeddings():
    bias = LatticePositionBias(num_heads=2, max_relative_distance=3)
    torch.nn.init.normal_(bias.embeddings.weight)
    start, end = torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 6]])
    got = bias(start, end)
    assert got.shape == (1, 2, 3, 3)
    W = bias.embeddings.weight
    # Query 2 = word (1, 6), key 0 = [CLS] (0, 0): distances ss=1, se=1, es=6 -> clipped 3, ee=6 -> 3.
    want = W[0 * 7 + 1 + 3] + W[1 * 7 + 1 + 3] + W[2 * 7 + 3 + 3] + W[3 * 7 + 3 + 3]
    torch.testing.assert_close(got[0, :, 2, 0], want)


@torch.no_grad()
def test_zero_bias_on_characters_is_plain_bert():
    from transformers import BertConfig
    from transformers import BertModel as HFBertModel

    lat = model(seed=1)
    lat.position_bias.embeddings.weight.zero_()
    cfg = config()
    ours = BertModel(cfg.model_copy(update={"vocab_size": lat.embeddings.word_embeddings.num_embeddings}),
                     add_pooling_layer=False).eval()
    missing, unexpected = ours.load_state_dict(lat.state_dict(), strict=False)
    assert not missing and unexpected == ["position_bias.embeddings.weight"]

    chars = ([CLS, 10, 11, 12, 13, SEP], list(range(6)), list(range(6)))
    other = ([CLS, 5, 6, SEP], list(range(4)), list(range(4)))
    batch = packed(chars, other)
    got = lat(**batch)
    want = ours(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    hf = HFBertModel(BertConfig(vocab_size=lat.embeddings.word_embeddings.num_embeddings, hidden_size=32,
                                num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0), add_pooling_layer=False).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    ref = hf(torch.tensor([chars[0]])).last_hidden_state[0]
    torch.testing.assert_close(got[:6], ref, rtol=1e-5, atol=1e-5)


def test_msp_pretraining_step_trains_the_bias():
    torch.manual_seed(0)
    m = build_pretraining_model(config())
    batch = packed(SEQ_A, SEQ_B)
    batch.update(mlm_positions=torch.tensor([2, 3, 4, 7, 8, 13]),
                 mlm_labels=torch.tensor([11, 12, 13, 65, 66, 70]))
    out = m(**batch)
    assert set(out["losses"]) == {"msp"} and out["num_predictions"] == 6
    assert out["mlm_logits"].shape == (6, 64 + 64)
    out["loss"].backward()
    assert m.lattice_bert.position_bias.embeddings.weight.grad.abs().sum() > 0
    # The output layer is tied to the shared character + word table.
    assert m.cls.predictions.decoder.weight is m.lattice_bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("num_words, rows", [(0, 64), (1, 128), (64, 128), (65, 192)])
def test_word_rows_round_up_to_64(num_words, rows):
    m = LatticeBertModel(config(lattice={"num_words": num_words}))
    assert m.embeddings.word_embeddings.num_embeddings == rows


def test_flops_are_berts_over_the_word_table_plus_the_bias():
    from kompakt.models.flops import model_flops

    lat = config()  # 64 characters + 20 words -> 128 rows, 2 layers, 4 heads
    bert = ModelConfig(**{**lat.model_dump(), "family": "bert", "vocab_size": 128})
    extra = model_flops(lat, [10, 6], 5) - model_flops(bert, [10, 6], 5)
    # 3 (forward + backward) x (3 sums + 2 layer adds) x 4 heads x (10^2 + 6^2) bias additions.
    assert extra == 3 * (3 + 2) * 4 * (100 + 36)


def test_msp_loss_falls_when_fitting_one_batch():
    torch.manual_seed(0)
    m = build_pretraining_model(config())
    batch = packed(SEQ_A, SEQ_B)
    labels = batch["input_ids"][[2, 3, 7, 11]].clone()
    batch["input_ids"][[2, 3, 7, 11]] = 3  # [MASK]
    batch.update(mlm_positions=torch.tensor([2, 3, 7, 11]), mlm_labels=labels)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = m(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_bias_gradient_equals_the_embedding_lookups():
    """The bias gathers with index_select (one index_add_ backward, not embedding's sorted dense backward):
    its values and its table's gradient are those of the four nn.Embedding lookups it replaces."""
    torch.manual_seed(0)
    bias = LatticePositionBias(num_heads=3, max_relative_distance=4)
    start = torch.randint(0, 12, (2, 9))
    end = start + torch.randint(0, 3, (2, 9))
    grad = torch.randn(2, 3, 9, 9)
    (bias(start, end) * grad).sum().backward()
    ours = bias.embeddings.weight.grad.clone()
    bias.embeddings.weight.grad = None
    width = 2 * 4 + 1
    ref = sum(bias.embeddings((q[:, :, None] - k[:, None, :]).clamp(-4, 4) + 4 + t * width)
              for t, (q, k) in enumerate(((start, start), (start, end), (end, start), (end, end))))
    torch.testing.assert_close(bias(start, end), ref.permute(0, 3, 1, 2))
    (ref.permute(0, 3, 1, 2) * grad).sum().backward()
    torch.testing.assert_close(ours, bias.embeddings.weight.grad)
    assert ours.abs().sum() > 0


def test_a_fresh_model_starts_with_local_attention_bias():
    """bias_init "locality" (the default): head h penalises characters |d| apart by slope_h * |d| (slopes 1
    down to 1/8, clipped at R = 4), a word by the mean over its two ends; "normal" is the old random start."""
    torch.manual_seed(0)
    bias = LatticeBertModel(config()).position_bias
    chars = torch.arange(7)[None]
    b = bias(chars, chars)[0]  # (H, L, L)
    slopes = torch.tensor([1.0, 0.5, 0.25, 0.125])
    d = (chars[0][:, None] - chars[0][None, :]).abs().clamp(max=4).float()
    torch.testing.assert_close(b, -slopes[:, None, None] * d)
    # a word over characters 2..4 seen from character 0: distances 2 (its start) and 4 (its end)
    spans_s, spans_e = torch.tensor([[0, 2]]), torch.tensor([[0, 4]])
    torch.testing.assert_close(bias(spans_s, spans_e)[0, :, 0, 1], -slopes * (2 + 4) / 2)
    torch.manual_seed(0)
    random = LatticeBertModel(config(lattice={"num_words": 20, "max_relative_distance": 4, "bias_init": "normal"}))
    assert random.position_bias.embeddings.weight.abs().max() < 0.2  # N(0, 0.02): no distance structure
