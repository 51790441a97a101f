"""Lattice-BERT task heads and fine-tuning features: the heads load a pretrained folder's encoder, padding
changes no logit, and every task type's features get the lexicon words of their characters appended, with
spans into the characters, label -100 and the task's positions untouched."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

import kompakt
from kompakt import hf_lattice
from kompakt.errors import ConfigError
from kompakt.finetune.lattice import LatticeTask, check_task
from kompakt.finetune.sequence import CLASSIFICATION, PAIR_CLASSIFICATION
from kompakt.finetune.tokens import TOKEN_CLASSIFICATION
from kompakt.lattice_inputs import Lexicon

kompakt.register_hf()

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = sorted(set("研究生命起源中国人民银行今天发布了新的报告"))
WORDS = ["研究", "研究生", "生命", "起源", "中国", "中国人", "人民", "银行", "今天", "发布", "报告"]
VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tokenizer():
    """A character-level BERT-style fast tokenizer: [CLS] A [SEP] (B [SEP]), one token per CJK character."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(handle_chinese_chars=True, lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def lexicon(tokenizer):
    return Lexicon.from_words(WORDS, tokenizer.get_vocab(), first_word_id=VOCAB, max_word_len=4)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    """A pretrained-style LatticeBertForMaskedLM folder with random (not initial) weights."""
    cfg = hf_lattice.LatticeBertConfig(vocab_size=VOCAB, num_words=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                       max_relative_distance=8, max_word_len=4)
    torch.manual_seed(0)
    model = hf_lattice.LatticeBertForMaskedLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("lattice") / "mlm"
    model.save_pretrained(out)
    return out


def _encoder_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.startswith("lattice_bert.")}


@pytest.mark.parametrize("auto, new", [(AutoModelForSequenceClassification, {"pooler", "classifier"}),
                                       (AutoModelForTokenClassification, {"classifier"})])
def test_heads_load_every_encoder_weight_of_a_pretrained_folder(mlm_dir, auto, new):
    mlm = hf_lattice.LatticeBertForMaskedLM.from_pretrained(mlm_dir)
    # finetune/train.py's load_model passes these: the head's labels and sdpa attention.
    model, loading = auto.from_pretrained(mlm_dir, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                                          label2id={"a": 0, "b": 1, "c": 2}, attn_implementation="sdpa",
                                          output_loading_info=True)
    assert type(model).__name__ == f"LatticeBert{auto.__name__[len('AutoModel'):]}"
    assert {k.split(".")[0] for k in loading["missing_keys"]} == new  # only the new head is initialised
    assert all(k.startswith("cls.") for k in loading["unexpected_keys"])  # the MLM head is left behind
    ours, theirs = _encoder_state(model), _encoder_state(mlm)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    assert model.config.num_labels == 3 and model.config.id2label[2] == "c"


def _features(kind, tokenizer, lexicon, examples, max_len=32, label2id=None):
    task = LatticeTask(kind, lexicon, tokenizer.cls_token_id, tokenizer.sep_token_id)
    return task, task.encode(examples, tokenizer, max_len, label2id or {}, train=True)


@torch.no_grad()
def test_padding_changes_no_logit(mlm_dir, tokenizer, lexicon):
    texts = [{"text": "研究生命起源", "label": "b"}, {"text": "中国人民银行今天发布了新的研究报告", "label": "a"}]
    task, feats = _features(CLASSIFICATION, tokenizer, lexicon, texts, label2id={"a": 0, "b": 1})
    assert len(feats[0]["input_ids"]) < len(feats[1]["input_ids"])  # the first row is padded in the batch
    seq = AutoModelForSequenceClassification.from_pretrained(mlm_dir, num_labels=2).eval()
    tokens = AutoModelForTokenClassification.from_pretrained(mlm_dir, num_labels=3).eval()
    both = task.collate(feats, tokenizer.pad_token_id)
    assert both["attention_mask"][0].sum() < both["attention_mask"].shape[1]
    for i, f in enumerate(feats):
        alone = task.collate([f], tokenizer.pad_token_id)
        n = len(f["input_ids"])
        torch.testing.assert_close(seq(**both).logits[i], seq(**alone).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tokens(**{k: v for k, v in both.items() if k != "labels"}).logits[i, :n],
                                   tokens(**{k: v for k, v in alone.items() if k != "labels"}).logits[0], rtol=1e-5,
                                   atol=1e-5)
    # The words matter: the same row without its words (characters only) gives other logits.
    first = task.collate(feats[:1], 0)
    n = sum(1 for i in feats[0]["input_ids"] if i < VOCAB)  # [CLS] characters [SEP], before the words
    chars = {k: v[:, :n] for k, v in first.items() if k != "labels"}
    assert not torch.allclose(seq(**chars).logits, seq(**first).logits, atol=1e-4)
    out = seq(**both)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, both["labels"]))


def test_token_features_append_words_with_spans_and_label_minus_100(tokenizer, lexicon):
    examples = [{"tokens": ["研究", "生命", "起源"], "tags": ["vn", "n", "n"]},
                {"tokens": ["中国", "人民", "银行"], "tags": ["ns", "n", "n"]}]
    label2id = {"vn": 0, "n": 1, "ns": 2}
    plain = TOKEN_CLASSIFICATION.encode(examples, tokenizer, 32, label2id, train=True)
    task, feats = _features(TOKEN_CLASSIFICATION, tokenizer, lexicon, [dict(e) for e in examples], 32, label2id)
    id2char = {i: t for t, i in tokenizer.get_vocab().items()}
    for p, f in zip(plain, feats):
        n = len(p["input_ids"])
        assert f["input_ids"][:n] == p["input_ids"] and f["first"] == p["first"] and f["labels"][:n] == p["labels"]
        assert len(f["input_ids"]) > n  # words were appended
        assert f["labels"][n:] == [-100] * (len(f["input_ids"]) - n)
        assert len(f["input_ids"]) == len(f["labels"]) == len(f["lattice_start"]) == len(f["token_type_ids"])
        assert f["lattice_start"][:n] == f["lattice_end"][:n] == list(range(n))
        for wid, s, e in zip(f["input_ids"][n:], f["lattice_start"][n:], f["lattice_end"][n:]):
            # Each word's span spells that word in the row's characters, inside the sentence.
            assert 1 <= s < e < n - 1
            assert "".join(id2char[c] for c in f["input_ids"][s:e + 1]) == WORDS[wid - VOCAB]
    words_of_first = {WORDS[w - VOCAB] for w in feats[0]["input_ids"][len(plain[0]["input_ids"]):]}
    assert words_of_first == {"研究", "研究生", "生命", "起源"}  # 研究生 crosses a gold word boundary: kept
    batch = task.collate(feats, tokenizer.pad_token_id)
    assert batch["lattice_start"].shape == batch["lattice_end"].shape == batch["input_ids"].shape == \
        batch["labels"].shape
    # One prediction per input word, read at the first character of each word.
    logits = [torch.randn(len(f["input_ids"]), 3).numpy() for f in feats]
    preds = task.predict(logits, feats, examples, list(label2id))
    assert [len(p) for p in preds] == [3, 3]


def test_words_beyond_max_seq_len_are_dropped(tokenizer, lexicon):
    ex = [{"tokens": list("中国人民银行今天发布了"), "tags": ["n"] * 11}]
    # (max_seq_len, characters with [CLS]/[SEP] kept, words kept): 8 cuts the sentence to 6 characters and
    # leaves no room; 16 holds 3 of its 6 words (中国 中国人 人民 银行 今天 发布), dropped from the end.
    for max_len, num_chars, num_words in ((8, 8, 0), (13, 13, 0), (16, 13, 3), (64, 13, 6)):
        plain = TOKEN_CLASSIFICATION.encode(ex, tokenizer, max_len, {"n": 0}, train=True)[0]
        assert len(plain["input_ids"]) == num_chars
        _, [f] = _features(TOKEN_CLASSIFICATION, tokenizer, lexicon, [dict(e) for e in ex], max_len, {"n": 0})
        assert f["input_ids"][:num_chars] == plain["input_ids"] and len(f["input_ids"]) == num_chars + num_words
        assert len(f["input_ids"]) <= max_len
        assert all(e < num_chars - 1 for e in f["lattice_end"][num_chars:])  # words over kept characters only
    assert [WORDS[w - VOCAB] for w in f["input_ids"][13:]] == ["中国", "中国人", "人民", "银行", "今天", "发布"]


def test_pair_features_keep_each_segment_s_words_and_type(tokenizer, lexicon):
    ex = [{"text": "研究报告", "text_pair": "人民银行", "label": "a"}]
    task, [f] = _features(PAIR_CLASSIFICATION, tokenizer, lexicon, ex, 32, {"a": 0})
    n = f["input_ids"].index(tokenizer.sep_token_id, 6) + 1  # [CLS] 4 [SEP] 4 [SEP]
    assert n == 11 and len(f["input_ids"]) == n + 4
    words = list(zip(f["input_ids"][n:], f["lattice_start"][n:], f["lattice_end"][n:], f["token_type_ids"][n:]))
    sep = f["input_ids"].index(tokenizer.sep_token_id)
    for _, s, e, t in words:
        assert (e < sep and t == 0) or (s > sep and t == 1)  # never across [SEP]; the segment's type
    assert [WORDS[w - VOCAB] for w, *_ in words] == ["研究", "报告", "人民", "银行"]


def test_retrieval_refuses_a_lattice_model_with_one_line(mlm_dir):
    from types import SimpleNamespace as NS

    with pytest.raises(ConfigError, match="retrieval fine-tuning does not support Lattice-BERT"):
        check_task(NS(name="search", type="retrieval"), mlm_dir)
    check_task(NS(name="sentiment", type="classification"), mlm_dir)


def test_qa_features_keep_answer_positions_and_never_answer_with_a_word(tokenizer, lexicon):
    from kompakt.finetune.qa import QUESTION_ANSWERING

    context = "中国人民银行今天发布了新的研究报告"
    ex = [{"question": "谁发布了报告", "context": context,
           "answers": {"text": ["人民银行"], "answer_start": [context.index("人民银行")]}}]
    plain = QUESTION_ANSWERING.encode([dict(e) for e in ex], tokenizer, 64, {}, train=True)
    task, feats = _features(QUESTION_ANSWERING, tokenizer, lexicon, [dict(e) for e in ex], 64)
    [p], [f] = plain, feats
    n = len(p["input_ids"])
    assert len(f["input_ids"]) > n and f["input_ids"][:n] == p["input_ids"]
    assert (f["start_positions"], f["end_positions"]) == (p["start_positions"], p["end_positions"]) != (0, 0)
    # Logits that favour a word token most of all still give an answer from the context's characters.
    width = len(f["input_ids"])
    start, end = torch.zeros(width), torch.zeros(width)
    start[n], end[n] = 9.0, 9.0  # the first word
    start[f["start_positions"]], end[f["end_positions"]] = 5.0, 5.0
    assert task.predict([torch.stack([start, end]).numpy()], feats, ex, []) == ["人民银行"]
