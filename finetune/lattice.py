"""Lattice-BERT in fine-tuning: every task type's features get the lexicon words of their characters.

A Lattice-BERT (model_type "lattice-bert") reads a sentence as its lattice, as in pretraining: the
tokenizer's row `[CLS] characters [SEP] (characters [SEP])` unchanged, then each lexicon word that matches a
run of characters inside one segment, with `lattice_start`/`lattice_end` (the word's first and last
character position in the row; a character or special has its own position twice). So the step is generic:
`LatticeTask` wraps any task type, runs its `encode` and appends the words to each feature, and runs its
`collate` and pads the spans. What the task type keyed by position stays valid, because the characters keep
their positions: token classification's `first` (one prediction per word of the input), QA's start/end and
offsets. Word tokens get the label -100 (token classification), so they are read but never scored.

Length: a feature holds at most `max_len` (the task's max_seq_len) tokens in all. The task type already cut
the characters to fit; the words that do not fit are dropped from the end (those of the last characters
first), so a sentence of 100 characters with max_seq_len 128 keeps the words of its first part (26 slots
after [CLS] and [SEP]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kompakt.errors import ConfigError
from kompakt.log import info

from kompakt.finetune.heads import pad


def check_task(task, model_dir: Path) -> None:
    """A ConfigError for a task type that cannot fine-tune a Lattice-BERT yet (retrieval: the bi-encoder's
    batches carry characters only, and its sentence-transformers export would not load the lattice)."""
    from kompakt.hf_lattice import is_lattice_folder

    if task.type == "retrieval" and is_lattice_folder(model_dir):
        raise ConfigError(f"task {task.name}: retrieval fine-tuning does not support Lattice-BERT ({model_dir}) yet; "
                          "leave the task out with finetune.tasks, or fine-tune another model on it")


@dataclass(frozen=True)
class LatticeTask:
    """A task type (finetune/heads.py's protocol) whose features carry the lattice: see the module docstring."""

    kind: object
    lexicon: object  # kompakt.lattice_inputs.Lexicon
    cls_id: int
    sep_id: int

    @property
    def auto_class(self) -> str:
        return self.kind.auto_class

    def head_kwargs(self, labels: list[str]) -> dict:
        return self.kind.head_kwargs(labels)

    def encode(self, examples: list[dict], tokenizer, max_len: int, label2id: dict, train: bool) -> list[dict]:
        feats = self.kind.encode(examples, tokenizer, max_len, label2id, train)
        return add_words(feats, self.lexicon, cls_id=self.cls_id, sep_id=self.sep_id, max_len=max_len)

    def collate(self, features: list[dict], pad_id: int) -> dict:
        batch = self.kind.collate(features, pad_id)
        batch["lattice_start"] = pad([f["lattice_start"] for f in features], 0)[0]
        batch["lattice_end"] = pad([f["lattice_end"] for f in features], 0)[0]
        return batch

    def num_predictions(self, batch: dict) -> int:
        return self.kind.num_predictions(batch)

    def rows(self, output, batch: dict) -> list:
        return self.kind.rows(output, batch)

    def predict(self, logits: list, features: list[dict], examples: list[dict], labels: list[str]) -> list:
        return self.kind.predict(logits, features, examples, labels)


def add_words(features: list[dict], lexicon, *, cls_id: int, sep_id: int, max_len: int) -> list[dict]:
    """Append each feature's lexicon words (in place, and returned): `input_ids`, `token_type_ids` (a word takes
    its segment's), `lattice_start`, `lattice_end`, and -100 in `labels` when the feature has per-token labels."""
    from kompakt.hf_lattice import lattice_of_row

    for f in features:
        lat = lattice_of_row(f["input_ids"], lexicon, cls_id=cls_id, sep_id=sep_id, max_len=max_len)
        num_words = len(lat) - lat.num_chars
        f["input_ids"] = lat.input_ids.tolist()
        f["token_type_ids"] = lat.token_type_ids.tolist()
        f["lattice_start"] = lat.lattice_start.tolist()
        f["lattice_end"] = lat.lattice_end.tolist()
        if isinstance(f.get("labels"), list):
            f["labels"] = f["labels"] + [-100] * num_words
    return features


def for_model(kind, model, model_dir: Path, tokenizer):
    """`kind` itself for a stock model; for a Lattice-BERT, `kind` wrapped in a `LatticeTask` with the folder's
    lexicon (word ids from config.vocab_size on, as in pretraining)."""
    if getattr(model.config, "model_type", None) != "lattice-bert":
        return kind
    from kompakt.hf_lattice import folder_lexicon

    lexicon = folder_lexicon(model_dir, model.config)
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ConfigError(f"{model_dir}: the tokenizer has no [CLS]/[SEP]; a Lattice-BERT row is [CLS] A [SEP] words")
    info(f"finetune: Lattice-BERT: {len(lexicon):,} lexicon words of {model_dir / 'lexicon.txt'} appended to each "
         "feature")
    return LatticeTask(kind, lexicon, tokenizer.cls_token_id, tokenizer.sep_token_id)


def folder_files(kind, model_dir: Path) -> list[Path]:
    """Files of the model folder a fine-tuned copy needs beside its weights and tokenizer: a Lattice-BERT's
    lexicon.txt (its word ids), so the kept folder builds the same lattices in eval and inference."""
    return [Path(model_dir) / "lexicon.txt"] if isinstance(kind, LatticeTask) else []
