"""Tokenizer training, the saved Hugging Face folder, the report and the packed shards, per kind.

Each kind trains once per module on the first 1,500 demo documents with a 2,000-token vocabulary
(rounded to 2,048) through the real stage body, so every test below reads real outputs.
"""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from kompakt.config import TokenizerConfig
from kompakt.runs import open_stage
from kompakt.shards import TokenShards
from kompakt.tokenization import stage
from kompakt.tokenization.corpus import corpus_files, is_heldout, iter_batches, write_corpus
from kompakt.tokenization.train import round_trip_target, special_tokens, train_tokenizer

NUM_DOCS = 1500
KINDS = {"wordpiece": "bert", "unigram": "albert", "bpe": "spanbert"}


@pytest.fixture(scope="module")
def corpus(demo_docs, tmp_path_factory):
    return write_corpus(demo_docs[:NUM_DOCS], tmp_path_factory.mktemp("corpus"), docs_per_file=600)


@pytest.fixture(scope="module", params=list(KINDS))
def trained(request, corpus, tmp_path_factory):
    """(config, finished stage directory) for one kind."""
    kind = request.param
    cfg = TokenizerConfig(kind=kind, family=KINDS[kind], vocab_size=2000, heldout_fraction=0.05,
                          docs_per_shard=700)
    run_dir = tmp_path_factory.mktemp(f"run-{kind}")
    with open_stage(run_dir, "tokenizer", cfg.model_dump(mode="json"), {"corpus": "test"}) as run:
        stage.run(cfg, corpus, run)
    return cfg, run.final_dir


def _corpus_column(corpus, name):
    return [t for b in iter_batches(corpus_files(corpus), [name]) for t in b.column(0).to_pylist()]


def _split_of(corpus, cfg, name):
    """The corpus column `name` of the training documents and of the held-out ones, in corpus order."""
    flags = [is_heldout(i, cfg.heldout_fraction) for i in _corpus_column(corpus, "id")]
    values = _corpus_column(corpus, name)
    return [v for v, f in zip(values, flags) if not f], [v for v, f in zip(values, flags) if f]


def test_vocab_is_multiple_of_64_and_specials_first(trained):
    cfg, out = trained
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == cfg.vocab_size_rounded == 2048
    for i, name in enumerate(special_tokens(cfg.family).values()):
        assert tok.token_to_id(name) == i
    assert json.loads((out / "report.json").read_text())["vocab_size"] == 2048


def test_autotokenizer_loads_offline_and_round_trips_norwegian(trained):
    from transformers import AutoTokenizer

    cfg, out = trained
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / "tokenizer" / name).is_file()
    hf = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(hf) == 2048 and hf.model_max_length == cfg.model_max_length
    assert hf.pad_token_id == 0 and hf.unk_token == special_tokens(cfg.family)["unk_token"]
    text = "Blåbærsyltetøy på Ærø"
    ids = hf(text)["input_ids"]
    assert ids[0] == hf.cls_token_id and ids[-1] == hf.sep_token_id
    assert hf.unk_token_id not in ids
    assert hf.decode(ids, skip_special_tokens=True) == text
    pair = hf("Hei", "på deg")
    assert pair["input_ids"][0] == hf.cls_token_id and pair["input_ids"].count(hf.sep_token_id) == 2
    assert pair["token_type_ids"][-1] == 1 and pair["token_type_ids"][0] == 0


def test_report_is_sensible(trained):
    _, out = trained
    report = json.loads((out / "report.json").read_text())
    h = report["heldout"]
    assert 20 < h["num_docs"] < 200  # 5% of 1,500
    assert h["unk_rate"] < 0.01
    assert 1.0 < h["fertility"] < 3.0
    assert 0.0 < h["whole_word_rate"] < 1.0
    assert h["round_trip_rate"] > 0.95
    assert h["round_trip_target"]
    assert h["units"] == "words" and "chars_per_token" not in h
    # What decoding restores of the text itself: for WordPiece too, once spacing around punctuation,
    # which its pre-tokenizer drops, is set aside (the old byte-exact row read 0 for every WordPiece).
    assert h["round_trip_spacing_rate"] > 0.95
    if report["kind"] == "wordpiece":
        assert h["round_trip_exact_rate"] is None
    else:
        assert h["round_trip_exact_rate"] > 0.95


@pytest.mark.parametrize("part", ["tokens", "heldout"])
def test_shards_decode_back_to_their_documents(trained, corpus, part):
    """tokens/ holds exactly the training documents and heldout/ exactly the held-out ones, in order."""
    cfg, out = trained
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    shards = TokenShards(out / part)
    train, heldout = _split_of(corpus, cfg, "text")
    texts = train if part == "tokens" else heldout
    assert shards.num_docs == len(texts) and len(shards.shards) == 3  # 1,500 docs at 700 per shard
    assert shards.index["split"] == ("train" if part == "tokens" else "heldout")
    assert shards.index["heldout_fraction"] == cfg.heldout_fraction
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["num_tokens" if part == "tokens" else "num_heldout_tokens"] == shards.num_tokens > 0
    assert counts["num_docs" if part == "tokens" else "num_heldout_docs"] == shards.num_docs
    decoded = tok.decode_batch([shards.document(g)[0].tolist() for g in range(shards.num_docs)],
                               skip_special_tokens=False)
    matches = [d == round_trip_target(tok, cfg.kind, t) for d, t in zip(decoded, texts)]
    assert np.mean(matches) > 0.97, [(d, t) for d, t, m in zip(decoded, texts, matches) if not m][:3]


def test_no_heldout_document_reaches_the_training_shards(trained, corpus):
    """Every held-out document's token sequence is in heldout/ and none is in tokens/."""
    cfg, out = trained
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    train, heldout = _split_of(corpus, cfg, "sentences")
    assert len(heldout) > 20

    def doc_ids(sentences):
        return tuple(i for e in tok.encode_batch(sentences, add_special_tokens=False) for i in e.ids)

    def shard_docs(part):
        shards = TokenShards(out / part)
        return {tuple(shards.document(g)[0].tolist()) for g in range(shards.num_docs)}

    held_docs, train_docs = {doc_ids(s) for s in heldout}, {doc_ids(s) for s in train}
    assert shard_docs("heldout") == held_docs
    assert shard_docs("tokens") == train_docs
    # Identical texts can be in both parts (the hash is of the id); none of these 1,500 are.
    assert not held_docs & train_docs


def test_sentence_offsets_follow_the_corpus(trained, corpus):
    cfg, out = trained
    for part, sentences in zip(("tokens", "heldout"), _split_of(corpus, cfg, "sentences")):
        shards = TokenShards(out / part)
        for g in (0, 1, shards.num_docs // 2, shards.num_docs - 1):
            _, _, sent_offsets = shards.document(g)
            assert len(sent_offsets) - 1 == len(sentences[g])


def test_word_starts_mark_word_beginnings(trained):
    cfg, out = trained
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    shards = TokenShards(out / "tokens")
    for g in range(0, shards.num_docs, 50):
        ids, ws, sents = shards.document(g)
        pieces = [tok.id_to_token(i) for i in ids.tolist()]
        ws = ws.astype(bool)
        assert ws[sents[:-1]].all(), "every sentence starts a word"
        if cfg.kind == "wordpiece":
            assert (ws == np.array([not p.startswith("##") for p in pieces])).all()
        elif cfg.kind == "unigram":
            assert (ws == np.array([p.startswith("▁") for p in pieces]) | np.isin(np.arange(len(ws)), sents)).all()
        else:
            # Byte-level: a word is what follows a space, so punctuation stays with its word.
            marked = np.array([p.startswith("Ġ") for p in pieces])
            assert (ws == marked | np.isin(np.arange(len(ws)), sents)).all()


def test_tokenizer_keeps_norwegian_letters_and_case(trained):
    _, out = trained
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    text = "Æ Ø Å æ ø å"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids).replace(" ", "") == text.replace(" ", "")


def test_heldout_documents_are_the_hashed_share(trained, corpus):
    cfg, out = trained
    ids = [i for b in iter_batches(corpus_files(corpus), ["id"]) for i in b.column(0).to_pylist()]
    report = json.loads((out / "report.json").read_text())
    assert report["heldout"]["num_docs"] == sum(is_heldout(i, cfg.heldout_fraction) for i in ids)
    assert TokenShards(out / "heldout").num_docs == report["heldout"]["num_docs"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_uncased_keeps_norwegian_letters(kind, demo_docs):
    """lowercase=true folds case but, with strip_accents false, keeps æ, ø and å."""
    cfg = TokenizerConfig(kind=kind, vocab_size=300, lowercase=True)
    tok = train_tokenizer(cfg, [demo_docs[:300]])
    text = "Blåbærsyltetøy på Ærø"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == round_trip_target(tok, kind, text)
    assert tok.decode(ids).replace(" ", "") == "blåbærsyltetøypåærø"


def test_spacing_free_sets_aside_only_the_spacing_a_decoder_cannot_know():
    from kompakt.tokenization.report import spacing_free

    assert spacing_free("Hei , deg . ( ja ) «nei»") == spacing_free("Hei, deg. (ja) « nei »")
    assert spacing_free("我 们 去 北 京 。") == spacing_free(" 我们去北京。 ") == "我们去北京。"
    assert spacing_free("to  ord\n") == "to ord"
    # Spaces between words still count, and so does a lost or changed character.
    assert spacing_free("toord") != spacing_free("to ord")
    assert spacing_free("Hei [UNK] deg") != spacing_free("Hei ☃ deg")
