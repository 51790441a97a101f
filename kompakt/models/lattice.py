"""Lattice-BERT (Lai et al., 2021): a BERT encoder over a lattice of characters and words.

Input: the packed batch of the batch contract plus, per token,

- `lattice_start` (T,) int64: position (within its sequence) of the token's first character,
- `lattice_end`   (T,) int64: position of its last character, inclusive.

A character at position i has span (i, i); [CLS] and [SEP] use their own position; a lexicon word over
characters i..j has (i, j) and sits after the sequence's final [SEP] (see pretrain/lattice.py, which
builds these inputs). Word tokens are ordinary vocabulary ids: characters and words share the
embedding table and the MLM output layer. `position_ids` is ignored; the absolute position of a token
is its `lattice_start`.

Lattice position attention: every layer adds to its attention scores a per-head bias

    bias[h, i, j] = E_ss[clip(s_i - s_j), h] + E_se[clip(s_i - e_j), h]
                  + E_es[clip(e_i - s_j), h] + E_ee[clip(e_i - e_j), h]

the SUM of four learned embeddings of relative distances, each clipped to [-R, R] with
R = `model.lattice.max_relative_distance`. The bias is computed once per forward and shared by all
layers (as T5 shares its relative bias), which costs R * H * L^2 floats per micro-batch (R grid rows). Absolute
positions enter BERT-style, through the position embedding of `lattice_start`. With the bias
tables at zero and a characters-only input, the model is exactly a BERT encoder (tested).

Attention runs through kompakt/models/packing.py's "rows" backend (or "padded"): the packed stream
is scattered into a grid of rows only for the SDPA call, and the bias is laid out on the same grid
and added to the plan's mask (-inf between different sequences of a row), so attention never
crosses a sequence boundary. The Hugging Face classes in kompakt/hf_lattice.py run the same
encoder on a padded batch.

Parameter names are HF `BertModel`'s plus `position_bias.embeddings.weight` (the four bias tables
stacked), so BERT weights load into a Lattice-BERT (`load_state_dict(..., strict=False)`) unchanged.

Legend: T tokens in the packed stream, B sequences, L longest sequence, H heads, D hidden size,
R max relative distance, M predicted positions.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from kompakt.model_config import ModelConfig
from kompakt.models.bert import (BertEmbeddings, BertEncoder, BertOnlyMLMHead, finish, init_weights, mlm_loss,
                                 record)
from kompakt.models.packing import AttentionPlan, plan_attention

# The four relative distances between the spans (s, e) of query i and key j, in the order of the
# bias table's blocks.
DISTANCE_TYPES = ("start-start", "start-end", "end-start", "end-end")


class LatticePositionBias(nn.Module):
    """Per-head attention bias from the clipped relative distances between two tokens' spans."""

    def __init__(self, num_heads: int, max_relative_distance: int):
        super().__init__()
        self.max_relative_distance = max_relative_distance
        # One table for the 4 distance types: rows [k * (2R + 1), (k + 1) * (2R + 1)) belong to type k.
        self.embeddings = nn.Embedding(len(DISTANCE_TYPES) * (2 * max_relative_distance + 1), num_heads)

    @torch.no_grad()
    def init_locality(self, max_slope: float = 1.0, min_slope: float = 0.125) -> None:
        """An ALiBi-style start: head h of H adds -slope_h * |d| between two characters d apart, the slopes
        geometric from `max_slope` to `min_slope`. Each of the 4 distance tables holds a quarter, so two
        characters (start = end) get the whole penalty and a word gets the mean over its two ends."""
        R, w = self.max_relative_distance, self.embeddings.weight
        H = w.shape[1]
        ratio = (min_slope / max_slope) ** (1 / (H - 1)) if H > 1 else 1.0
        slopes = max_slope * ratio ** torch.arange(H, dtype=torch.float32)
        distance = torch.arange(-R, R + 1, dtype=torch.float32).abs()
        w.copy_((-distance[:, None] * slopes[None, :] / 4).repeat(len(DISTANCE_TYPES), 1).to(w.dtype))

    def forward(self, start_BL: torch.Tensor, end_BL: torch.Tensor) -> torch.Tensor:
        """The bias (R, H, L, L) for spans (R, L) laid out on a grid of R rows."""
        R = self.max_relative_distance
        width = 2 * R + 1
        table = self.embeddings.weight
        bias_BLLH = None
        for t, (query_BL, key_BL) in enumerate(((start_BL, start_BL), (start_BL, end_BL),
                                                (end_BL, start_BL), (end_BL, end_BL))):
            index_BLL = (query_BL[:, :, None] - key_BL[:, None, :]).clamp(-R, R) + R + t * width
            # index_select, not nn.Embedding's call: its backward is one index_add_ into the 4 * (2R + 1)
            # rows, where embedding's dense backward sorts all R * L^2 indices first (on CPU a third of a
            # training step of the demo-zh model, 4x128 at sequence 128 plus words).
            term = table.index_select(0, index_BLL.reshape(-1)).view(*index_BLL.shape, table.shape[1])
            bias_BLLH = term if bias_BLLH is None else bias_BLLH + term
        return bias_BLLH.permute(0, 3, 1, 2)


def to_grid(x_T: torch.Tensor, plan: AttentionPlan, fill: int = 0) -> torch.Tensor:
    """Scatter a per-token tensor (T, ...) of the packed stream into the plan's (rows, L, ...) grid."""
    L = plan.max_seqlen
    num_slots = plan.pad_slots.numel() + x_T.shape[0]
    out = x_T.new_full((num_slots, *x_T.shape[1:]), fill)
    return out.index_copy(0, plan.index_T, x_T).view(num_slots // L, L, *x_T.shape[1:])


def lattice_plan(position_bias: LatticePositionBias, cu_seqlens: torch.Tensor, max_seqlen: int | None,
                 lattice_start: torch.Tensor, lattice_end: torch.Tensor, dtype: torch.dtype,
                 backend: str = "rows") -> AttentionPlan:
    """An attention plan on a grid backend whose mask is the additive lattice bias plus the plan's own
    masking: "rows" (sequences bin-packed into rows, -inf across sequences) or "padded" (one row per
    sequence, the most negative float on padding keys)."""
    assert backend in ("rows", "padded"), "the lattice bias needs an additive-mask grid backend"
    plan = plan_attention(cu_seqlens, max_seqlen, lattice_start.shape[0], backend=backend, dtype=dtype)
    bias_RHLL = position_bias(to_grid(lattice_start, plan), to_grid(lattice_end, plan)).to(dtype)
    if backend == "rows":
        # plan.mask is (R, 1, L, L): 0 within a sequence, -inf across (padding slots see each other).
        return dataclasses.replace(plan, mask=bias_RHLL + plan.mask)
    # plan.mask is (B, 1, 1, L), True on real keys. Padding keys get the most negative float rather
    # than -inf, so a row with no real key (an empty sequence) stays finite instead of NaN.
    return dataclasses.replace(plan, mask=bias_RHLL.masked_fill(~plan.mask, torch.finfo(dtype).min))


def num_embedding_rows(cfg: ModelConfig) -> int:
    """Rows of the shared character + word table: vocab_size + num_words rounded up to a multiple of 64."""
    assert cfg.vocab_size is not None, "model.vocab_size is filled from the tokenizer before building"
    return cfg.vocab_size + (cfg.lattice.num_words + 63) // 64 * 64


class LatticeBertModel(nn.Module):
    """The Lattice-BERT encoder: a packed lattice batch in, hidden states (T, D) out.

    The bias needs an additive mask, so attention runs on a grid backend: "padded" when
    `model.attention` says so, else "rows" (also on CUDA, where flex and varlen take no bias)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg.model_copy(update={"vocab_size": num_embedding_rows(cfg)}),
                                         cfg.hidden_size)
        self.position_bias = LatticePositionBias(cfg.num_heads, cfg.lattice.max_relative_distance)
        self.encoder = BertEncoder(cfg)
        init_weights(self, cfg.initializer_range)
        if cfg.lattice.bias_init == "locality":
            self.position_bias.init_locality()

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, lattice_start: torch.Tensor,
                lattice_end: torch.Tensor, max_seqlen: int | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_rows: torch.Tensor | None = None, taps: list | None = None) -> torch.Tensor:
        """Hidden states (T, D), or only `output_rows` of them, (N, D).

        `position_ids` is accepted for the batch contract and ignored: a lattice token's absolute
        position is its `lattice_start`. With `output_rows` the last layer runs past attention on
        those rows only (exact, as in kompakt.models.bert.BertModel). With `taps` (a list) it
        receives BertModel's layout (kompakt.models.bert.record): `{"hidden"}` for the embeddings,
        then `{"hidden", "qkv"}` per layer, for distillation."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x_TD = self.embeddings(input_ids, lattice_start, token_type_ids)
        backend = "padded" if self.cfg.attention == "padded" else "rows"
        plan = lattice_plan(self.position_bias, cu_seqlens, max_seqlen, lattice_start, lattice_end,
                            x_TD.dtype, backend)
        record(taps, x_TD)
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            tap = {} if taps is not None else None
            x_TD = layer(x_TD, plan, output_rows if i == last else None, tap)
            record(taps, x_TD, tap)
        return x_TD


class LatticeBertForPreTraining(nn.Module):
    """Lattice-BERT with masked segment prediction (MSP): the MLM head on the masked lattice tokens,
    characters and words alike (their ids share one output layer tied to the embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.lattice_bert = LatticeBertModel(cfg)
        head_cfg = cfg.model_copy(update={"vocab_size": num_embedding_rows(cfg)})
        self.cls = BertOnlyMLMHead(head_cfg, self.lattice_bert.embeddings.word_embeddings)
        init_weights(self.cls, cfg.initializer_range)

    def forward(self, input_ids, cu_seqlens, lattice_start, lattice_end, mlm_positions, mlm_labels=None,
                max_seqlen=None, token_type_ids=None, position_ids=None) -> dict:
        """Packed lattice batch in; dict with loss, losses {"msp"}, num_predictions, mlm_logits (M, V) out."""
        x_MD = self.lattice_bert(input_ids, cu_seqlens, lattice_start, lattice_end, max_seqlen,
                                 token_type_ids, output_rows=mlm_positions)
        logits_MV = self.cls.predictions(x_MD)
        losses = {"msp": mlm_loss(logits_MV, mlm_labels)} if mlm_labels is not None else {}
        return finish({"mlm_logits": logits_MV}, losses, mlm_positions.numel())


def build_lattice_model(cfg: ModelConfig) -> LatticeBertForPreTraining:
    """The pretraining model of family "lattice" (called by kompakt.models.build_pretraining_model)."""
    return LatticeBertForPreTraining(cfg)
