"""Attention over a packed batch: B sequences laid end to end in one flat stream of T tokens.

The models never pad: embeddings, projections, feed-forward layers and heads all run on the (T, D)
stream. Only the attention call needs to know where each sequence starts (`cu_seqlens`), and the
whole choice of kernel lives here, behind `plan_attention` (once per forward) and `attend` (per layer):

- "padded" (the CPU default): scatter q/k/v into (B, Lmax) just for the SDPA call, with a key-padding
  mask, and gather the real rows back. Cost is B * Lmax^2, not T^2. Measured on 2 CPU cores, forward
  plus backward of one attention call, 32 sequences of 20-128 tokens (T=2377), 4 heads of 64: padded
  33 ms, block-diagonal mask 180 ms, nested jagged tensors 95 ms (tests/unit/test_models_packing.py
  checks the equivalence; eval/bench_model.py the end-to-end speed).
- "mask": one (T, T) block-diagonal boolean mask. Quadratic in T; the reference the others are tested
  against, and a fallback for any device.
- "flex": FlexAttention with a document mask (`create_block_mask`); skips whole blocks across documents.
- "varlen": `torch.nn.attention.varlen.varlen_attn` (flash varlen), CUDA with fp16/bf16 only.

"auto" picks "varlen" on CUDA in half precision, "flex" on CUDA in fp32, and "padded" elsewhere.

Legend: T tokens in the stream, B sequences, L longest sequence (max_seqlen), H heads, K head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "padded", "mask", "flex", "varlen")


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
    index_T: torch.Tensor | None = None  # padded: flat slot of each token in the (B * L) grid
    mask: torch.Tensor | None = None  # padded: (B, 1, 1, L) keys to attend; mask: (1, 1, T, T)
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
    return "padded"


def plan_attention(cu_seqlens: torch.Tensor, max_seqlen: int | None, num_tokens: int,
                   backend: str = "auto", dtype: torch.dtype = torch.float32) -> AttentionPlan:
    """Precompute the index tensors or masks of the chosen backend for one packed batch."""
    device = cu_seqlens.device
    backend = resolve_backend(backend, device, dtype)
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
    elif backend == "mask":
        plan.mask = (seq_T[:, None] == seq_T[None, :])[None, None]
    elif backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(b, h, q_idx, kv_idx):
            return seq_T[q_idx] == seq_T[kv_idx]

        plan.block_mask = create_block_mask(same_document, None, None, num_tokens, num_tokens, device=device)
    return plan


def attend(q_THK: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor, plan: AttentionPlan,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention inside each sequence of the packed stream; returns (T, H, K)."""
    T, H, K = q_THK.shape
    if plan.backend == "padded":
        B, L = plan.num_seqs, plan.max_seqlen

        def pad(x_THK):
            x_NHK = x_THK.new_zeros(B * L, H, K).index_copy(0, plan.index_T, x_THK)
            return x_NHK.view(B, L, H, K).transpose(1, 2)

        out_BHLK = F.scaled_dot_product_attention(pad(q_THK), pad(k_THK), pad(v_THK), attn_mask=plan.mask,
                                                  dropout_p=dropout_p)
        return out_BHLK.transpose(1, 2).reshape(B * L, H, K).index_select(0, plan.index_T)
    if plan.backend == "mask":
        q, k, v = (x.transpose(0, 1)[None] for x in (q_THK, k_THK, v_THK))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, dropout_p=dropout_p)
        return out[0].transpose(0, 1)
    if plan.backend == "flex":
        q, k, v = (x.transpose(0, 1)[None] for x in (q_THK, k_THK, v_THK))
        out = _flex_attention(q.device)(q, k, v, block_mask=plan.block_mask)
        return out[0].transpose(0, 1)
    if plan.backend == "varlen":
        varlen_attn = _varlen_attn()
        cu = plan.cu_seqlens.to(torch.int32)
        return varlen_attn(q_THK, k_THK, v_THK, cu, cu, plan.max_seqlen, plan.max_seqlen)
    raise AssertionError(f"unplanned backend {plan.backend}")


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
