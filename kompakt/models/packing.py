"""Attention over a packed batch: B sequences laid end to end in one flat stream of T tokens.

The models never pad: embeddings, projections, feed-forward layers and heads all run on the (T, D)
stream. Only the attention call needs to know where each sequence starts (`cu_seqlens`), and the
whole choice of kernel lives here, behind `plan_attention` (once per forward) and `attend` (per layer):

- "rows" (the CPU default): bin-pack the sequences into R rows of width L (first-fit decreasing),
  scatter q/k/v into (R, L) just for the SDPA call with a per-row block-diagonal mask, and gather the
  real tokens back. Cost is R * L^2 with R close to T / L, the same
  attention work as cutting the stream into full rows, but attention stays inside each sequence.
- "padded": one row per sequence, (B, L), with a key-padding mask. Cost B * L^2: with many short
  sequences (the demo corpus averages 43 tokens under L=128) about 3x the attention work of "rows".
  Lattice-BERT builds its per-sequence position bias on this layout.
  Measured on 2 CPU cores (shared with other jobs, so ranges over runs), forward plus backward of one
  attention call over demo-like sequences (106 sequences, mean 38 and at most 128 tokens, T=4041, 4 heads
  of 64): rows 0.23-0.39 s, padded 0.43-0.64 s, block-diagonal (T, T) mask 1.8-2.4 s, nested jagged
  tensors 4.5-8.7 s; SDPA on T/128 full rows with no mask at all 0.14-0.18 s. tests/unit/test_models_packing.py
  checks the equivalence; pretrain/bench_model.py measures the end-to-end speed.
- "mask": one (T, T) block-diagonal boolean mask. Quadratic in T; the reference the others are tested
  against, and a fallback for any device.
- "flex": FlexAttention with a document mask (`create_block_mask`); skips whole blocks across documents.
- "varlen": `torch.nn.attention.varlen.varlen_attn` (flash varlen), CUDA with fp16/bf16 only.

"auto" picks "varlen" on CUDA in half precision, "flex" on CUDA in fp32, and "rows" elsewhere. Every
backend also takes a local window (`plan_attention(..., window=w)`: |i - j| <= w inside a sequence,
ModernBERT's local layers); varlen has none here and gives way to flex.

Legend: T tokens in the stream, B sequences, L longest sequence (max_seqlen), H heads, K head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "rows", "padded", "mask", "flex", "varlen")


def seq_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Lengths (B,) int64 from cumulative starts (B+1,)."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def sequence_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """For each of the T tokens, the index of the sequence it belongs to (T,) int64."""
    lengths = seq_lengths(cu_seqlens)
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths,
                                   output_size=num_tokens)


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Position ids (T,) that restart at 0 at every sequence start."""
    seq_T = sequence_ids(cu_seqlens, num_tokens)
    return torch.arange(num_tokens, device=cu_seqlens.device) - cu_seqlens.long()[seq_T]


@dataclass
class AttentionPlan:
    """What `attend` needs, computed once per forward and shared by every layer."""

    backend: str
    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_tokens: int
    num_seqs: int
    index_T: torch.Tensor | None = None  # padded/rows: flat slot of each token in the (B or R) * L grid
    num_rows: int = 0  # rows: R
    pad_slots: torch.Tensor | None = None  # padded/rows: grid slots holding no token
    # padded: (B, 1, 1, L) bool, keys to attend; rows: (R, 1, L, L) float, 0 within a sequence and -inf
    # across; mask: (1, 1, T, T) bool
    mask: torch.Tensor | None = None
    block_mask: object | None = None  # flex: a BlockMask


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for `backend` ("auto" or a name) on this device and dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None:
            return "varlen"
        return "flex"
    return "rows"


def plan_attention(cu_seqlens: torch.Tensor, max_seqlen: int | None, num_tokens: int,
                   backend: str = "auto", dtype: torch.dtype = torch.float32,
                   window: int | None = None) -> AttentionPlan:
    """Precompute the index tensors or masks of the chosen backend for one packed batch.

    With `window` (local attention, ModernBERT's) a token also sees only the tokens of its sequence at
    most `window` positions away; the flash varlen kernel has no window here, so it becomes "flex"."""
    device = cu_seqlens.device
    backend = resolve_backend(backend, device, dtype)
    if window is not None and backend == "varlen":
        backend = "flex"
    num_seqs = cu_seqlens.numel() - 1
    if max_seqlen is None:
        max_seqlen = int(seq_lengths(cu_seqlens).max())
    plan = AttentionPlan(backend, cu_seqlens, int(max_seqlen), num_tokens, num_seqs)
    seq_T = sequence_ids(cu_seqlens, num_tokens)
    if backend == "padded":
        pos_T = torch.arange(num_tokens, device=device) - cu_seqlens.long()[seq_T]
        plan.index_T = seq_T * plan.max_seqlen + pos_T
        keys_BL = torch.arange(plan.max_seqlen, device=device)[None, :] < seq_lengths(cu_seqlens)[:, None]
        plan.mask = keys_BL[:, None, None, :]
        if window is not None:  # padding queries keep their window, so no row is all masked (no NaN)
            near_LL = _near(plan.max_seqlen, window, device)
            plan.mask = (near_LL[None] & (keys_BL[:, None, :] | ~keys_BL[:, :, None]))[:, None]
    elif backend == "rows":
        rows_B, offsets_B = _fill_rows(seq_lengths(cu_seqlens).tolist(), plan.max_seqlen)
        rows_B, offsets_B = (torch.tensor(x, device=device) for x in (rows_B, offsets_B))
        plan.num_rows = int(rows_B.max()) + 1
        pos_T = torch.arange(num_tokens, device=device) - cu_seqlens.long()[seq_T]
        plan.index_T = rows_B[seq_T] * plan.max_seqlen + offsets_B[seq_T] + pos_T
        # Padding slots get sequence id -1: they attend only each other (no all-masked row, so no NaN).
        slot_seq = torch.full((plan.num_rows * plan.max_seqlen,), -1, device=device).index_copy(
            0, plan.index_T, seq_T).view(plan.num_rows, plan.max_seqlen)
        same_RLL = slot_seq[:, :, None] == slot_seq[:, None, :]
        if window is not None:  # a sequence's slots are contiguous in its row: slot distance = position distance
            same_RLL &= _near(plan.max_seqlen, window, device)[None]
        # Additive float mask: SDPA's CPU kernel ran about 15% faster with it than with a boolean one.
        plan.mask = torch.zeros(same_RLL.shape, dtype=dtype, device=device).masked_fill_(
            ~same_RLL, float("-inf"))[:, None]
    elif backend == "mask":
        plan.mask = seq_T[:, None] == seq_T[None, :]
        if window is not None:
            plan.mask &= _near(num_tokens, window, device)
        plan.mask = plan.mask[None, None]
    if plan.index_T is not None:
        grid_rows = plan.num_rows if backend == "rows" else num_seqs
        free = torch.ones(grid_rows * plan.max_seqlen, dtype=torch.bool, device=device)
        free[plan.index_T] = False
        plan.pad_slots = free.nonzero().squeeze(1)
    elif backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(b, h, q_idx, kv_idx):
            same = seq_T[q_idx] == seq_T[kv_idx]
            return same if window is None else same & ((q_idx - kv_idx).abs() <= window)

        plan.block_mask = create_block_mask(same_document, None, None, num_tokens, num_tokens, device=device)
    return plan


def _near(n: int, window: int, device) -> torch.Tensor:
    """(n, n) bool: |i - j| <= window."""
    i = torch.arange(n, device=device)
    return (i[:, None] - i[None, :]).abs() <= window


def attend(q_THK: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor, plan: AttentionPlan,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention inside each sequence of the packed stream; returns (T, H, K)."""
    if plan.backend in ("padded", "rows"):
        return attend_qkv(torch.stack([q_THK, k_THK, v_THK], 1), plan, dropout_p)
    if plan.backend == "mask":
        q, k, v = (x.transpose(0, 1)[None] for x in (q_THK, k_THK, v_THK))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, dropout_p=dropout_p)
        return out[0].transpose(0, 1)
    if dropout_p > 0 and plan.backend in ("flex", "varlen"):
        raise ValueError(f"attention backend {plan.backend!r} has no attention dropout; "
                         "set model.dropout=0 (the pretraining default) or model.attention=mask")
    if plan.backend == "flex":
        q, k, v = (x.transpose(0, 1)[None] for x in (q_THK, k_THK, v_THK))
        out = _flex_attention(q.device)(q, k, v, block_mask=plan.block_mask)
        return out[0].transpose(0, 1)
    if plan.backend == "varlen":
        varlen_attn = _varlen_attn()
        cu = plan.cu_seqlens.to(torch.int32)
        return varlen_attn(q_THK, k_THK, v_THK, cu, cu, plan.max_seqlen, plan.max_seqlen)
    raise AssertionError(f"unplanned backend {plan.backend}")


def attend_qkv(qkv_T3HK: torch.Tensor, plan: AttentionPlan, dropout_p: float = 0.0) -> torch.Tensor:
    """`attend` on the fused projection (T, 3, H, K): the grid backends scatter it in one pass, not three."""
    if plan.backend not in ("padded", "rows"):
        return attend(*qkv_T3HK.unbind(1), plan, dropout_p)
    T, _, H, K = qkv_T3HK.shape
    N, L = plan.pad_slots.numel() + T, plan.max_seqlen
    # Only the padding slots are zeroed (about 2% with "rows"): filling the whole grid cost as much as SDPA.
    grid_N3HK = qkv_T3HK.new_empty(N, 3, H, K)
    grid_N3HK.index_fill_(0, plan.pad_slots, 0.0)
    grid_N3HK.index_copy_(0, plan.index_T, qkv_T3HK)
    q, k, v = (x.transpose(1, 2) for x in grid_N3HK.view(N // L, L, 3, H, K).unbind(2))
    out_RHLK = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, dropout_p=dropout_p)
    return out_RHLK.transpose(1, 2)[plan.index_T // L, plan.index_T % L]


def _fill_rows(lengths: list[int], width: int) -> tuple[list[int], list[int]]:
    """Row and start offset of each sequence, packed into rows of `width` tokens first-fit decreasing.

    Longest first, each into the first row with room: about 1-3% more rows than T / width on the demo
    corpus, against 25% more when the rows are filled in stream order."""
    rows, offsets, used = [0] * len(lengths), [0] * len(lengths), []
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[b]
        r = next((r for r, u in enumerate(used) if u + n <= width), len(used))
        if r == len(used):
            used.append(0)
        rows[b], offsets[b] = r, used[r]
        used[r] += n
    return rows, offsets


_COMPILED_FLEX = {}


def _flex_attention(device: torch.device):
    """flex_attention, compiled on CUDA (eager flex materialises the full score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _COMPILED_FLEX:
        _COMPILED_FLEX["cuda"] = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX["cuda"]


def _varlen_attn():
    """torch's flash varlen kernel when this torch build has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn
