"""A student under distillation: the student's own pretraining model plus the learned parts of its losses.

The training engine wraps this module, so the projections (TinyBERT's W_e and W_h, CompRess's
embedding map) and the CompRess memory bank are trained, checkpointed and resumed with the student,
and dropped at export: the released folder is the student alone. Forward runs the student on a packed
batch and returns what the losses (kompakt/compress/losses.py) read; it computes no loss itself, since
the teacher's side is not its business.
"""

from __future__ import annotations

import torch
from torch import nn

from kompakt.models.packing import sequence_ids


def encoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the packed encoder, the MLM head or None) of a kompakt pretraining model or bare encoder."""
    for name in ("bert", "albert", "lattice_bert", "model"):
        encoder = getattr(model, name, None)
        if isinstance(encoder, nn.Module):
            break
    else:
        encoder = model  # a bare BertModel/AlbertModel (a sentence encoder such as all-MiniLM-L6-v2)
    if hasattr(model, "cls"):
        head = model.cls.predictions
    elif hasattr(model, "mlm_head"):  # ModernBERT: its head and tied decoder are two top-level modules
        head = model.mlm_head()
    else:
        head = getattr(model, "predictions", None)
    return encoder, head


def run_encoder(encoder: nn.Module, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int | None = None, position_ids: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, lattice_start: torch.Tensor | None = None,
                lattice_end: torch.Tensor | None = None, taps: list | None = None) -> torch.Tensor:
    """The packed encoder on a batch, (T, D). A Lattice-BERT batch (it carries `lattice_start` and
    `lattice_end`) goes to the lattice encoder by keyword: its signature orders its arguments otherwise."""
    if lattice_start is not None:
        return encoder(input_ids, cu_seqlens, lattice_start=lattice_start, lattice_end=lattice_end,
                       max_seqlen=max_seqlen, token_type_ids=token_type_ids, taps=taps)
    return encoder(input_ids, cu_seqlens, max_seqlen, position_ids, token_type_ids, taps=taps)


def mean_pool(x_TD: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean of each packed sequence's hidden states, (B, D): sentence-transformers' pooling."""
    B = cu_seqlens.numel() - 1
    seq = sequence_ids(cu_seqlens, x_TD.shape[0])
    sums = torch.zeros(B, x_TD.shape[1], dtype=x_TD.dtype, device=x_TD.device).index_add_(0, seq, x_TD)
    counts = (cu_seqlens[1:] - cu_seqlens[:-1]).to(x_TD.dtype).clamp_min(1)
    return sums / counts[:, None]


class DistillationModel(nn.Module):
    """Student + projections to the teacher's width (only where widths differ) + the CompRess bank."""

    def __init__(self, student: nn.Module, teacher_width: int, *, project: bool, similarity_bank: int = 0):
        super().__init__()
        self.student = student
        width = student.cfg.hidden_size
        differ = width != teacher_width
        self.emb_proj = nn.Linear(width, teacher_width) if project and differ else None
        self.hidden_proj = nn.Linear(width, teacher_width) if project and differ else None
        self.sim_proj = nn.Linear(width, teacher_width) if similarity_bank and differ else None
        if similarity_bank:
            # A FIFO of past teacher embeddings (unit vectors); a buffer, so checkpoints carry it.
            self.register_buffer("bank", torch.zeros(similarity_bank, teacher_width))
            self.register_buffer("bank_count", torch.zeros((), dtype=torch.long))

    def forward(self, input_ids, cu_seqlens, max_seqlen=None, mlm_positions=None, mlm_labels=None,
                position_ids=None, token_type_ids=None, lattice_start=None, lattice_end=None) -> dict:
        """Packed batch in (a Lattice-BERT's with `lattice_start`/`lattice_end`); `taps`
        (kompakt.models.bert.record), `hidden` (projected per tap), `mlm_logits` at `mlm_positions`
        when the student has an MLM head, `pooled` (B, D_teacher)."""
        encoder, head = encoder_and_head(self.student)
        taps: list[dict] = []
        x_TD = run_encoder(encoder, input_ids, cu_seqlens, max_seqlen, position_ids, token_type_ids,
                           lattice_start, lattice_end, taps=taps)
        hidden = [taps[0]["hidden"] if self.emb_proj is None else self.emb_proj(taps[0]["hidden"])]
        hidden += [t["hidden"] if self.hidden_proj is None else self.hidden_proj(t["hidden"]) for t in taps[1:]]
        out = {"taps": taps, "hidden": hidden}
        if head is not None and mlm_positions is not None and mlm_positions.numel():
            out["mlm_logits"] = head(x_TD[mlm_positions])
        pooled = mean_pool(x_TD, cu_seqlens)
        out["pooled"] = pooled if self.sim_proj is None else self.sim_proj(pooled)
        return out

    @torch.no_grad()
    def push_bank(self, emb_BD: torch.Tensor) -> None:
        """Enqueue teacher embeddings (already unit length), overwriting the oldest."""
        n = self.bank.shape[0]
        idx = (self.bank_count + torch.arange(emb_BD.shape[0], device=emb_BD.device)) % n
        self.bank[idx] = emb_BD.to(self.bank.dtype)
        self.bank_count += emb_BD.shape[0]
