"""Chinese: a character-level WordPiece vocabulary plus a word lexicon (jieba's dictionary) for lattice models."""

import json

import numpy as np
import pytest
from pydantic import ValidationError

from kompakt.config import TokenizerConfig
from kompakt.errors import ConfigError
from kompakt.runs import open_stage
from kompakt.shards import TokenShards
from kompakt.tokenization import stage
from kompakt.tokenization.corpus import write_corpus
from kompakt.tokenization.lexicon import build_lexicon, lexicon_source

SENTENCES = [
    "我们今天去北京大学参观。", "北京是中国的首都，有很多历史古迹。", "他在上海工作了三年。",
    "中国人民喜欢吃饺子和面条。", "今天天气很好，我们去公园散步吧。", "学生们在图书馆里认真学习。",
    "这个问题很难回答。", "我喜欢学习语言和历史。", "上海的经济发展很快。", "大学的老师都很认真。",
]


@pytest.fixture(scope="module")
def chinese_run(tmp_path_factory):
    # 10 sentences, each repeated as 6 documents (ids differ), enough for min_frequency=2.
    corpus = write_corpus(SENTENCES * 6, tmp_path_factory.mktemp("zh"), lang="zh")
    cfg = TokenizerConfig(kind="wordpiece", family="lattice", vocab_size=200, chinese_chars=True,
                          lexicon="jieba", lexicon_size=40, heldout_fraction=0.1)
    with open_stage(tmp_path_factory.mktemp("run"), "tokenizer", cfg.model_dump(mode="json"), {}) as run:
        stage.run(cfg, corpus, run)
    return cfg, run.final_dir


def test_vocabulary_is_character_level(chinese_run):
    from transformers import AutoTokenizer

    cfg, out = chinese_run
    hf = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(hf) == cfg.vocab_size_rounded == 256
    # About 100 distinct characters: the rest of the 256 ids are [unusedN] padding.
    assert "[unused0]" in hf.get_vocab()
    ids = hf("我们去北京", add_special_tokens=False)["input_ids"]
    assert hf.convert_ids_to_tokens(ids) == ["我", "们", "去", "北", "京"]


def test_every_chinese_character_is_a_word_start(chinese_run):
    _, out = chinese_run
    shards, heldout = TokenShards(out / "tokens"), TokenShards(out / "heldout")
    assert shards.num_docs + heldout.num_docs == 60 and heldout.num_docs > 0
    _, ws, _ = shards.document(0)
    assert ws.all()


def test_jieba_lexicon_keeps_frequent_words_over_the_vocabulary(chinese_run):
    cfg, out = chinese_run
    vocab = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    lines = (out / "tokenizer" / "lexicon.txt").read_text(encoding="utf-8").splitlines()
    words = [line.split("\t")[0] for line in lines]
    freqs = [int(line.split("\t")[1]) for line in lines]
    assert 10 < len(words) <= cfg.lexicon_size
    assert all(len(w) > 1 and all(c in vocab for c in w) for w in words)
    assert freqs == sorted(freqs, reverse=True)
    assert {"我们", "北京", "中国"} <= set(words)
    assert json.loads((out / "report.json").read_text())["num_lexicon_words"] == len(words)


def test_custom_lexicon_file_and_missing_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("北京 10\n北京 99\n大学\n上海 50 ns\n火星 80\n", encoding="utf-8")
    vocab = {c: i for i, c in enumerate("北京大学上海")}
    assert build_lexicon(vocab, lexicon_source(str(path)), 10) == [("上海", 50), ("北京", 10), ("大学", 1)]
    with pytest.raises(ConfigError, match="does not exist"):
        lexicon_source(str(tmp_path / "missing.txt"))


def test_config_rejects_chinese_options_that_cannot_work():
    with pytest.raises(ValidationError, match="chinese_chars needs tokenizer.kind=wordpiece"):
        TokenizerConfig(kind="unigram", chinese_chars=True)
    with pytest.raises(ValidationError, match="lexicon is for Chinese"):
        TokenizerConfig(lexicon="jieba")
    assert TokenizerConfig(vocab_size=30_000).vocab_size_rounded == 30_016
    assert np.all([TokenizerConfig(vocab_size=v).vocab_size_rounded % 64 == 0 for v in (64, 65, 127, 50_000)])


def test_report_counts_characters_not_whitespace_words(chinese_run):
    """Fertility per whitespace word is a whole sentence here; the report speaks per character."""
    _, out = chinese_run
    h = json.loads((out / "report.json").read_text())["heldout"]
    assert h["units"] == "characters" and h["fertility"] is None and h["whole_word_rate"] is None
    assert h["chars_per_token"] == 1.0  # character-level: one token per character
    assert h["unk_per_char"] == 0.0
    # jieba's 40 most frequent words over these characters cover about half of them (我们, 北京, 中国...).
    assert 0.2 < h["lexicon_coverage"] <= 1.0
    assert h["round_trip_spacing_rate"] == 1.0


def test_mostly_cjk_text_is_reported_per_character_without_chinese_chars():
    from kompakt.tokenization.report import evaluate
    from kompakt.tokenization.train import train_tokenizer

    tok = train_tokenizer(TokenizerConfig(kind="unigram", family="albert", vocab_size=300), [SENTENCES * 6])
    h = evaluate(tok, "unigram", [SENTENCES], "<unk>")
    assert h["units"] == "characters" and h["lexicon_coverage"] is None
    assert h["chars_per_token"] > 1.0  # unigram pieces span several characters
    assert h["round_trip_exact_rate"] == 1.0
