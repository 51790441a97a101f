"""Masked examples -> one packed micro-batch (the batch contract of kompakt's pretraining models).

The micro-batch is a flat, unpadded stream of T tokens holding B sequences:

    input_ids, position_ids, token_type_ids   (T,) int64
    cu_seqlens                                (B+1,) int32, 0 ... T
    max_seqlen                                python int
    mlm_positions, mlm_labels                 (M,) int64, flat indices into the stream
    sop_labels                                (B,) int64    only with objective.sop
    sbo_left, sbo_right, sbo_rel              (M,) int64    only with objective.masking=span

`masking=msp` (Lattice-BERT) is delegated as a whole to `kompakt.pretrain.lattice.collate_msp`
(see `collate_examples`), which returns the same keys plus its `lattice_*` tensors.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from kompakt.errors import KompaktError
from kompakt.objective_config import ObjectiveConfig
from kompakt.pretrain.masking import Example, MaskedExample, SpecialIds, mask_example


def collate(masked: list[MaskedExample]) -> dict:
    """Pack masked sequences into the flat tensors of the batch contract."""
    assert masked, "a micro-batch holds at least one sequence"
    lengths = np.array([len(m.input_ids) for m in masked], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lengths)))
    total = int(starts[-1])
    batch = {
        "input_ids": torch.from_numpy(np.concatenate([m.input_ids for m in masked])),
        "cu_seqlens": torch.from_numpy(starts.astype(np.int32)),
        "max_seqlen": int(lengths.max()),
        "position_ids": torch.from_numpy(np.arange(total, dtype=np.int64) - np.repeat(starts[:-1], lengths)),
        "token_type_ids": torch.from_numpy(np.concatenate([m.token_type_ids for m in masked])),
        "mlm_positions": torch.from_numpy(_shifted([m.mlm_positions for m in masked], starts)),
        "mlm_labels": torch.from_numpy(np.concatenate([m.mlm_labels for m in masked]).astype(np.int64)),
    }
    if masked[0].sop_label >= 0:
        batch["sop_labels"] = torch.tensor([m.sop_label for m in masked], dtype=torch.int64)
    if masked[0].sbo_left is not None:
        batch["sbo_left"] = torch.from_numpy(_shifted([m.sbo_left for m in masked], starts))
        batch["sbo_right"] = torch.from_numpy(_shifted([m.sbo_right for m in masked], starts))
        batch["sbo_rel"] = torch.from_numpy(np.concatenate([m.sbo_rel for m in masked]).astype(np.int64))
    return batch


def _shifted(parts: list[np.ndarray], starts: np.ndarray) -> np.ndarray:
    """Concatenate per-sequence positions, each moved by its sequence's start in the stream."""
    return np.concatenate([p + s for p, s in zip(parts, starts[:-1].tolist())]).astype(np.int64)


def collate_examples(examples: list[Example], cfg: ObjectiveConfig, specials: SpecialIds, seed: int,
                     lexicon=None) -> dict:
    """Mask every example (by its own sample index) and pack them into one micro-batch.

    For `cfg.masking == "msp"` this calls `kompakt.pretrain.lattice.collate_msp(examples, cfg,
    specials, seed, lexicon)`, which the Lattice-BERT code provides and which must also be a pure
    function of (seed, example.index); `lexicon` is the run's word lexicon (see MLMCollator).
    """
    if cfg.masking == "msp":
        return _lattice_collator()(examples, cfg, specials, seed, lexicon=lexicon)
    return collate([mask_example(ex, cfg, specials, seed) for ex in examples])


def _lattice_collator():
    try:
        lattice = importlib.import_module("kompakt.pretrain.lattice")
    except ModuleNotFoundError as err:
        if err.name != "kompakt.pretrain.lattice":
            raise
        lattice = None
    fn = getattr(lattice, "collate_msp", None)
    if fn is None:
        raise KompaktError("pretrain.objective.masking=msp: lattice collation needs "
                           "pretrain/lattice.py with collate_msp(examples, cfg, specials, seed); "
                           "install the Lattice-BERT code or choose another masking")
    return fn
