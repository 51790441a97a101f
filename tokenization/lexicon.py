"""The Chinese word lexicon for Lattice-BERT models (`lexicon.txt`).

The tokenizer's vocabulary is character-level (every CJK character is its own token); the lexicon
lists the multi-character words a lattice model may match over those characters. `lexicon: jieba`
reads jieba's shipped dictionary (jieba/dict.txt, about 349k words with corpus frequencies, MIT);
any other value is a path to a file in the same format (`word [frequency [tag]]` per line, a missing
frequency counts as 1). The `lexicon_size` most frequent words whose characters are all in the
vocabulary are kept, ties in file order.
"""

from __future__ import annotations

from pathlib import Path

from kompakt.errors import ConfigError, DataError


def lexicon_source(name: str) -> Path:
    """The file behind `tokenizer.lexicon`."""
    if name == "jieba":
        try:
            import jieba
        except ImportError:
            raise ConfigError("tokenizer.lexicon=jieba needs the jieba package; pip install jieba") from None
        return Path(jieba.__file__).parent / "dict.txt"
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"tokenizer.lexicon: {path} does not exist; give a word list or 'jieba'")
    return path


def build_lexicon(vocab: dict[str, int], source: Path, size: int) -> list[tuple[str, int]]:
    """The `size` most frequent multi-character words of `source` spelt with vocabulary characters."""
    chars = {t for t in vocab if len(t) == 1}
    words: dict[str, tuple[int, int]] = {}
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{source}: not UTF-8 ({err.reason} at byte {err.start}); convert the word list to UTF-8") from None
    for i, line in enumerate(lines):
        parts = line.split()
        if not parts:
            continue
        word = parts[0]
        freq = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 1
        if len(word) > 1 and word not in words and all(c in chars for c in word):
            words[word] = (freq, i)
    ranked = sorted(words.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:size]
    return [(w, f) for w, (f, _) in ranked]


def write_lexicon(path: Path, words: list[tuple[str, int]]) -> None:
    """One `word<TAB>frequency` per line, most frequent first."""
    Path(path).write_text("".join(f"{w}\t{f}\n" for w, f in words), encoding="utf-8")
