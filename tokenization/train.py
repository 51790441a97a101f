"""Building, training and saving the tokenizer (Hugging Face `tokenizers`).

Three kinds, each a complete pipeline of normalizer, pre-tokenizer, model and decoder:

- wordpiece: BERT's normalizer (cased unless `lowercase`, accents kept unless `strip_accents`),
  BERT's pre-tokenizer (whitespace and punctuation), `##` continuation pieces. The decoder's
  English clean-up (" ." -> ".", " 's" -> "'s") is off: it would rewrite Norwegian text, so decode
  gives the pre-tokenised words joined by one space, and that is what round trips are checked against.
- unigram: whitespace collapsed and stripped, SentencePiece-style `▁` word marker (Metaspace).
- bpe: byte-level BPE with a prefix space (every sentence starts a word the same way); no
  unknown tokens ever, and the decoder drops that one prefix space again.

All kinds put the family's special tokens first ([PAD]=0), add [CLS] ... [SEP] (and pairs) in the
post-processor, and are padded with `[unusedN]` tokens to exactly `vocab_size_rounded` ids.

Training is deterministic: the same texts and config give the same tokenizer.json bytes in every
process, whatever PYTHONHASHSEED, thread count or num_proc (tests/integration/test_tokenizer_determinism.py).
The trainers iterate Rust hash maps with a per-process random seed; WordPiece is fixed by seeding
its alphabet in a sorted order (`_train_wordpiece`), Unigram by re-estimating its scores in a fixed
order (tokenization/unigram.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from kompakt.config import TokenizerConfig
from kompakt.log import warn
from kompakt.runs import write_json_atomic
from kompakt.tokenization.unigram import canonical_unigram

# Longest word (in characters) WordPiece splits; longer ones become one [UNK], as in BERT.
MAX_WORD_CHARS = 100
# Longest Unigram piece in characters; SentencePiece's default.
MAX_PIECE_CHARS = 16


def special_tokens(family: str) -> dict[str, str]:
    """The family's special tokens by role, in id order (pad=0, unk=1, cls=2, sep=3, mask=4),
    from its registry entry (kompakt/families.py)."""
    from kompakt import families

    return dict(families.get(family).special_tokens)


def _normalizer(cfg: TokenizerConfig) -> normalizers.Normalizer | None:
    if cfg.kind == "wordpiece":
        # strip_accents must be passed explicitly: BERT's default (None) strips them whenever it lowercases.
        return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                          strip_accents=cfg.strip_accents, lowercase=cfg.lowercase)
    steps: list[normalizers.Normalizer] = []
    if cfg.kind == "unigram":
        steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if cfg.strip_accents:
        steps += [normalizers.NFD(), normalizers.StripAccents(), normalizers.NFC()]
    if cfg.lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps) if steps else None


def build_tokenizer(cfg: TokenizerConfig) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer of `cfg.kind` and its trainer."""
    specials = list(special_tokens(cfg.family).values())
    unk = specials[1]
    size = cfg.vocab_size_rounded
    if cfg.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk, max_input_chars_per_word=MAX_WORD_CHARS))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        trainer = trainers.WordPieceTrainer(vocab_size=size, min_frequency=cfg.min_frequency,
                                            special_tokens=specials, continuing_subword_prefix="##",
                                            show_progress=False)
    elif cfg.kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=specials, unk_token=unk,
                                          max_piece_length=MAX_PIECE_CHARS, show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
        tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(content=" ", left=1, right=0)])
        trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=cfg.min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    norm = _normalizer(cfg)
    if norm is not None:
        tok.normalizer = norm
    return tok, trainer


def _finish(tok: Tokenizer, cfg: TokenizerConfig) -> Tokenizer:
    """Add the [CLS]/[SEP] template and pad the vocabulary to a multiple of 64."""
    st = special_tokens(cfg.family)
    cls, sep = st["cls_token"], st["sep_token"]
    template = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    if cfg.kind == "bpe":
        # Trim the leading space out of the offsets of "Ġword" tokens, as RoBERTa does.
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=True), template])
    else:
        tok.post_processor = template
    target = cfg.vocab_size_rounded
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > target:
        # Only when the alphabet alone exceeds the budget (e.g. many CJK characters): keep every
        # character and round the larger size up to the next multiple of 64 instead.
        target = (n + 63) // 64 * 64
        warn(f"tokenizer.vocab_size={cfg.vocab_size}: the trained vocabulary has {n} tokens; "
             f"using {target}, raise tokenizer.vocab_size to silence this")
    if n < target:
        tok.add_special_tokens([AddedToken(f"[unused{i}]", special=True, normalized=False)
                                for i in range(target - n)])
    assert tok.get_vocab_size(with_added_tokens=True) == target, "vocabulary padding is off"
    return tok


TextSource = Callable[[], Iterable[list[str]]]


def _source(texts: TextSource | Sequence[list[str]]) -> TextSource:
    """A function that gives the training batches afresh: training reads them more than once."""
    if callable(texts):
        return texts
    if iter(texts) is texts:
        raise TypeError("train_tokenizer reads the texts twice: pass a list of batches or a function "
                        "returning a fresh iterator, not an iterator")
    return lambda: texts


def _train_wordpiece(cfg: TokenizerConfig, texts: TextSource) -> Tokenizer:
    """WordPiece training with every tie broken the same way in every process.

    The trainer (BPE merges underneath) picks the most frequent pair and breaks ties by the pair's
    token ids. Characters get ids in code-point order, but the `##c` continuation characters get
    theirs in the order of a hash map of words whose seed is random per process, so tied merges
    came out in a different order and two trainings of the demo corpus differed in 18 tokens and
    631 ids. A first pass with no merges (vocab_size 1, which costs one counting pass and no
    merge loop) finds the alphabet; the second pass is given it, sorted (characters, then `##`
    characters), as its first tokens, so every id and every tie is fixed before training starts.
    """
    specials = list(special_tokens(cfg.family).values())
    probe, _ = build_tokenizer(cfg)
    probe.train_from_iterator(texts(), trainer=trainers.WordPieceTrainer(
        vocab_size=1, special_tokens=specials, continuing_subword_prefix="##", show_progress=False))
    alphabet = sorted((t for t in probe.get_vocab(with_added_tokens=False) if t not in specials),
                      key=lambda t: (t.startswith("##") and len(t) > 2, t))
    tok, _ = build_tokenizer(cfg)
    trainer = trainers.WordPieceTrainer(vocab_size=cfg.vocab_size_rounded, min_frequency=cfg.min_frequency,
                                        special_tokens=specials + alphabet, continuing_subword_prefix="##",
                                        show_progress=False)
    tok.train_from_iterator(texts(), trainer=trainer)
    # The seeded alphabet went in as special tokens only to fix its ids: keep it as ordinary
    # vocabulary, or "##a" typed in a text would be matched as an added token.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] in specials]
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def train_tokenizer(cfg: TokenizerConfig, texts: TextSource | Sequence[list[str]]) -> Tokenizer:
    """Train on text batches: a list of batches, or a function returning a fresh iterator of them
    (streamed, so the corpus is never held in memory; it is read two or three times).

    The result is the same bytes in every process and on any number of threads (see
    `_train_wordpiece` and tokenization/unigram.py; byte-level BPE needs no help: its initial
    alphabet is the 256 byte characters in code-point order and it has no continuation tokens).
    """
    texts = _source(texts)
    if cfg.kind == "wordpiece":
        tok = _train_wordpiece(cfg, texts)
    else:
        tok, trainer = build_tokenizer(cfg)
        tok.train_from_iterator(texts(), trainer=trainer)
        if cfg.kind == "unigram":
            tok = canonical_unigram(tok, len(special_tokens(cfg.family)), texts, MAX_PIECE_CHARS)
    for i, name in enumerate(special_tokens(cfg.family).values()):
        assert tok.token_to_id(name) == i, f"special token {name} is not id {i}"
    return _finish(tok, cfg)


def save_hf(tok: Tokenizer, cfg: TokenizerConfig, folder: Path) -> None:
    """Save an AutoTokenizer-loadable folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    specials = special_tokens(cfg.family)
    # token_type_ids: every family here has segment embeddings, so pairs must carry them.
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=cfg.model_max_length,
                                 clean_up_tokenization_spaces=False,
                                 model_input_names=["input_ids", "token_type_ids", "attention_mask"], **specials)
    hf.save_pretrained(str(folder))
    # transformers 5 names its own backend class and no longer writes special_tokens_map.json;
    # the generic class name and the map keep the folder loadable by transformers 4 as well.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json_atomic(config_path, config)
    write_json_atomic(folder / "special_tokens_map.json", specials)


def round_trip_target(tok: Tokenizer, kind: str, text: str) -> str:
    """What decode(encode(text)) must equal when nothing is lost.

    wordpiece: the normalised text's pre-tokenised words joined by one space (BERT's pre-tokenizer
    drops the whitespace between a word and punctuation, so that is all a decoder can restore);
    unigram and bpe: the normalised text itself.
    """
    norm = tok.normalizer.normalize_str(text) if tok.normalizer is not None else text
    if kind == "wordpiece":
        return " ".join(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(norm))
    return norm
