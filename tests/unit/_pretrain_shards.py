"""Test data for the pretraining objectives: a tiny WordPiece and token shards of the demo corpus.

Built once per session (cached here) so the masking, collate and loader tests share it without
depending on the tokenization stage.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from kompakt.shards import ShardWriter, TokenShards, write_index

NUM_DOCS = 2000
VOCAB = 2000
_CACHE: dict = {}


def demo_tokenizer_and_shards(root: Path, docs: list[str]) -> tuple[Tokenizer, TokenShards]:
    """(tokenizer, shards) over the first NUM_DOCS demo documents, two shards, sentences split on . ! ?"""
    if "built" in _CACHE:
        return _CACHE["built"]
    docs = docs[:NUM_DOCS]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(docs, trainer)
    folder = root / "shards"
    folder.mkdir(parents=True)
    vocab_size = tok.get_vocab_size()
    entries = []
    for k, part in enumerate((docs[: NUM_DOCS // 2], docs[NUM_DOCS // 2:])):
        writer = ShardWriter(folder, k, vocab_size)
        for doc in part:
            sentences = [s for s in re.split(r"(?<=[.!?])\s+", doc.strip()) if s]
            encoded = tok.encode_batch(sentences, add_special_tokens=False)
            writer.add_document([(e.ids, [0 if t.startswith("##") else 1 for t in e.tokens]) for e in encoded])
        entries.append(writer.close())
    write_index(folder, entries, vocab_size)
    _CACHE["built"] = (tok, TokenShards(folder))
    return _CACHE["built"]
