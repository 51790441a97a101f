"""Loading a tokenization run's tokenizer, and the special-token ids every stage needs.

Core, so every stage that reads token shards (pretraining, distillation, inference) loads the
tokenizer the same way and agrees on [CLS]/[SEP]/[MASK]/[PAD].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kompakt.errors import DataError, KompaktError

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]")


def load_tokenizer(tokenizer_dir: Path):
    """The fast tokenizer the tokenization stage saved (`tokenizer.json`)."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; re-run `kompakt tokenizer` for this recipe")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path} is not a readable tokenizer ({first[:160]}); re-run `kompakt tokenizer --force`") from None


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens and of the tokens a random replacement may draw from."""

    cls: int
    sep: int
    mask: int
    pad: int
    vocab_size: int
    # Ids never drawn as random replacements ([UNK] and every other special as well).
    excluded: tuple[int, ...] = ()
    replacement_ids: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        banned = {self.cls, self.sep, self.mask, self.pad, *self.excluded}
        ids = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64), np.fromiter(banned, dtype=np.int64))
        object.__setattr__(self, "replacement_ids", ids)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialIds:
        """Read the ids from a `tokenizers.Tokenizer` or a Hugging Face fast tokenizer.

        ALBERT-style tokenizers may name them `[CLS]`/`[SEP]`/`[MASK]`/`<pad>`; both spellings work.
        """
        lookup = getattr(tokenizer, "token_to_id", None)
        if lookup is None:  # transformers tokenizer
            vocab = tokenizer.get_vocab()
            lookup = vocab.get
            size = len(vocab)
        else:
            size = tokenizer.get_vocab_size(with_added_tokens=True)

        def find(*names: str) -> int:
            for name in names:
                i = lookup(name)
                if i is not None:
                    return int(i)
            raise KompaktError(f"tokenizer has none of the special tokens {names}; train it with the "
                               f"model family's special tokens (tokenizer.family in the recipe)")

        unk = [i for i in (lookup("[UNK]"), lookup("<unk>")) if i is not None]
        return cls(cls=find("[CLS]", "<cls>"), sep=find("[SEP]", "<sep>"), mask=find("[MASK]", "<mask>"),
                   pad=find("[PAD]", "<pad>"), vocab_size=size, excluded=tuple(int(i) for i in unk))
