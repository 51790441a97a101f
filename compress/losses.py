"""Distillation losses on packed batches: TinyBERT, MiniLMv2 relations, CompRess similarity, MLM logits.

Every loss is zero when the student equals the teacher (same weights, identity layer map): the MSEs
trivially, the KLs because KL(p || p) = 0 (a soft cross-entropy would leave the teacher's entropy).
Attention and relation losses need per-sequence (B, H, L, L) matrices: the packed (T, H, K)
projections are scattered into a padded (B, L) grid for those two only; the models themselves run
packed, with no padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kompakt.models.packing import position_ids_from_cu_seqlens, sequence_ids


def unpack(x_T: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed (T, ...) -> padded (B, L, ...) with zeros, and the (B, L) bool mask of real tokens."""
    T = x_T.shape[0]
    B = cu_seqlens.numel() - 1
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    L = int(max_len or lengths.max())
    seq = sequence_ids(cu_seqlens, T)
    pos = position_ids_from_cu_seqlens(cu_seqlens, T)
    flat = seq * L + pos
    out = x_T.new_zeros((B * L, *x_T.shape[1:])).index_copy(0, flat, x_T)
    mask = torch.zeros(B * L, dtype=torch.bool, device=x_T.device).index_fill_(0, flat, True)
    return out.view(B, L, *x_T.shape[1:]), mask.view(B, L)


def hidden_mse(student_TD: torch.Tensor, teacher_TD: torch.Tensor) -> torch.Tensor:
    """Mean squared error over tokens and dimensions (TinyBERT's embedding and hidden losses)."""
    return F.mse_loss(student_TD.float(), teacher_TD.float())


def attention_scores(qkv_T3HK: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-softmax attention scores Q K^T / sqrt(K) per sequence, (B, H, L, L), and the (B, 1, L, L) pair mask."""
    qkv, mask = unpack(qkv_T3HK.float(), cu_seqlens)          # (B, L, 3, H, K)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, H, L, K)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    pair = mask[:, None, :, None] & mask[:, None, None, :]
    return scores, pair


def attention_mse(student_qkv: torch.Tensor, teacher_qkv: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """TinyBERT's attention loss: MSE of the pre-softmax scores over real (query, key) pairs and heads.

    TinyBERT compares unnormalised scores (it found them to converge faster than probabilities);
    padding pairs, which its code zeroes, are simply left out here."""
    s, pair = attention_scores(student_qkv, cu_seqlens)
    t, _ = attention_scores(teacher_qkv, cu_seqlens)
    pair = pair.expand_as(s)
    return ((s - t) ** 2)[pair].mean()


def _relation_logp(x_TD: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(x_r x_r^T / sqrt(d_r)) over the keys of each sequence, per relation head: (B, R, L, L)."""
    x, mask = unpack(x_TD.float(), cu_seqlens)                # (B, L, D)
    B, L, D = x.shape
    d = D // num_heads
    x = x.view(B, L, num_heads, d).transpose(1, 2)           # (B, R, L, d)
    logits = x @ x.transpose(-1, -2) / math.sqrt(d)
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.log_softmax(logits, dim=-1), mask


def relation_kl(student_TD: torch.Tensor, teacher_TD: torch.Tensor, cu_seqlens: torch.Tensor,
                num_heads: int) -> torch.Tensor:
    """MiniLMv2: KL(teacher relation || student relation) of one kind (Q-Q, K-K or V-V), mean over
    relation heads and real query positions. Widths may differ; both split into `num_heads`."""
    log_s, mask = _relation_logp(student_TD, cu_seqlens, num_heads)
    log_t, _ = _relation_logp(teacher_TD, cu_seqlens, num_heads)
    p_t = log_t.exp()
    # Padded keys have p_t = 0 and log p = -inf: 0 * (-inf - -inf) is nan, so they are zeroed first.
    key = mask[:, None, None, :]
    kl = torch.where(key, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(-1)   # (B, R, L)
    return kl.masked_select(mask[:, None, :].expand_as(kl)).mean()


def qkv_relations(student_qkv: torch.Tensor, teacher_qkv: torch.Tensor, cu_seqlens: torch.Tensor,
                  num_heads: int) -> torch.Tensor:
    """Sum of the Q-Q, K-K and V-V relation KLs (MiniLMv2), from (T, 3, H, K) projections."""
    total = student_qkv.new_zeros((), dtype=torch.float32)
    for i in range(3):
        s = student_qkv[:, i].reshape(student_qkv.shape[0], -1)
        t = teacher_qkv[:, i].reshape(teacher_qkv.shape[0], -1)
        total = total + relation_kl(s, t, cu_seqlens, num_heads)
    return total


def logits_kl(student_MV: torch.Tensor, teacher_MV: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) times T^2, mean over predictions (Hinton et al. 2015)."""
    log_s = torch.log_softmax(student_MV.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_MV.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature ** 2


def similarity_kl(student_BD: torch.Tensor, teacher_BD: torch.Tensor, bank_ND: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """CompRess-1q: KL between the teacher's and the student's softmax similarities to the bank's anchors.

    Both embeddings are unit-normalised; the bank holds unit teacher embeddings of earlier batches
    (and the current batch's, so the distribution is defined from the first step)."""
    s = F.normalize(student_BD.float(), dim=-1)
    t = F.normalize(teacher_BD.float(), dim=-1)
    log_s = torch.log_softmax(s @ bank_ND.T / temperature, dim=-1)
    log_t = torch.log_softmax(t @ bank_ND.T / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
