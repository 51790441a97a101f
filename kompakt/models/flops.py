"""Model FLOPs of one training step (forward + backward) on a packed batch, for tokens/s -> MFU.

For a micro-batch of B sequences with lengths l_b (T = sum l_b tokens) and M predicted positions:

    flops = 6 * N_body * T                          every token passes through the body's matmuls
          + 6 * N_last * R                          the last layer past attention, on the head's R rows
          + 12 * D * U * sum_b l_b^2                attention scores QK^T and the weighted sum AV
          + 6 * N_head * M                          the MLM (and SBO) head, on predicted rows only
          + 6 * N_seq * B                           pooler + SOP/NSP classifier, once per sequence

- 6 = 2 FLOPs per multiply-add, times 3 for forward + backward (the backward costs twice the forward).
- N_body counts weight matrices only (biases, LayerNorms, GELUs and softmax are under 1% and left out):
  per layer use 4 D^2 (query, key, value, output) + 2 D F (feed-forward), except that the last layer
  use counts only its 3 D^2 query/key/value for every token; ALBERT adds its factorised projection E D.
  The embedding lookup is not a matmul and is excluded.
- N_last = D^2 + 2 D F: the last layer's output projection and feed-forward run only on the R rows the
  heads read (bert: R = M; albert: M + B, the [CLS] rows for SOP; spanbert: 3 M, the masked tokens and
  their span boundaries), as the models compute them (see BertModel.forward's `output_rows`).
- U is the number of layer uses: num_layers for BERT/SpanBERT/Lattice-BERT; num_layers * inner_group_num
  for ALBERT, whose shared layers count once per use, not once per parameter.
- Attention per layer use: a token in a sequence of length l does 2 l D multiply-adds for its scores and
  2 l D for its output, i.e. 4 l D FLOPs forward, 12 l D with backward; summed over the sequence's l tokens
  that is 12 D l^2. Packing keeps it per sequence (sum of l_b^2), not (sum of l_b)^2.
- N_head per predicted row: BERT/SpanBERT transform D^2 + decoder D V; ALBERT dense D E + decoder E V;
  SpanBERT adds its SBO head 3 D^2 + D^2 + D V.
- N_seq per sequence: ALBERT's pooler D^2 + SOP classifier 2 D (MLM-only BERT has none).
  Lattice-BERT adds its word rows to V and the position bias additions (`lattice_model_flops`).

Legend: D hidden size, F intermediate size, E ALBERT embedding width, V vocabulary, L layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kompakt.model_config import ModelConfig


def layer_uses(cfg: ModelConfig) -> int:
    """How many transformer layers each token passes through (ALBERT: shared layers counted per use)."""
    return cfg.num_layers * cfg.inner_group_num if cfg.family == "albert" else cfg.num_layers


def body_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the matmuls every token passes through, counted once per use (N_body)."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    n = (layer_uses(cfg) - 1) * (4 * D * D + 2 * D * F) + 3 * D * D
    if cfg.family == "albert":
        n += cfg.embedding_size * D
    return n


def last_layer_rows(cfg: ModelConfig, num_predictions: int, num_seqs: int) -> int:
    """R: the rows that go through the last layer's output projection and feed-forward."""
    if cfg.family == "albert":
        return num_predictions + num_seqs
    return 3 * num_predictions if cfg.family == "spanbert" else num_predictions


def head_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the per-predicted-row heads (N_head): MLM, plus SBO for SpanBERT."""
    D, V = cfg.hidden_size, cfg.vocab_size
    if cfg.family == "albert":
        return D * cfg.embedding_size + cfg.embedding_size * V
    n = D * D + D * V
    if cfg.family == "spanbert":
        n += 3 * D * D + D * D + D * V
    return n


def sequence_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the once-per-sequence heads (N_seq): ALBERT's pooler and SOP classifier."""
    D = cfg.hidden_size
    return D * D + 2 * D if cfg.family == "albert" else 0


def model_flops(cfg: ModelConfig, seq_lens: Sequence[int] | torch.Tensor, num_predictions: int) -> float:
    """Training FLOPs (forward + backward) of one packed micro-batch, by the family's registered count."""
    from kompakt import families

    return families.get(cfg.family).resolve("flops")(cfg, seq_lens, num_predictions)


def bert_model_flops(cfg: ModelConfig, seq_lens: Sequence[int] | torch.Tensor, num_predictions: int) -> float:
    """BERT, ALBERT and SpanBERT: see the module docstring."""
    lens = torch.as_tensor(seq_lens, dtype=torch.float64)
    num_tokens, num_seqs = float(lens.sum()), lens.numel()
    # 4 D l FLOPs per token forward (QK^T and AV), times 3 with backward, summed over each sequence's l tokens.
    attention = 12 * cfg.hidden_size * layer_uses(cfg) * float((lens * lens).sum())
    D, F = cfg.hidden_size, cfg.intermediate_size
    last = 6 * (D * D + 2 * D * F) * last_layer_rows(cfg, num_predictions, num_seqs)
    return (6 * body_matmul_params(cfg) * num_tokens + last + attention
            + 6 * head_matmul_params(cfg) * num_predictions + 6 * sequence_matmul_params(cfg) * num_seqs)


def flops_per_token(cfg: ModelConfig, seq_lens: Sequence[int] | torch.Tensor, num_predictions: int) -> float:
    """`model_flops` divided by the batch's real tokens: multiply by tokens/s and divide by peak for MFU."""
    return model_flops(cfg, seq_lens, num_predictions) / float(torch.as_tensor(seq_lens).sum())


def seq_lens_from_cu(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sequence lengths (B,) from the batch's cumulative starts (B+1,)."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).cpu()


def lattice_model_flops(cfg: ModelConfig, seq_lens: Sequence[int] | torch.Tensor,
                        num_predictions: int) -> float:
    """Lattice-BERT: BERT's count over all lattice tokens (characters and words; `seq_lens` are the
    packed lengths), the MLM decoder over the character + word table, plus the position bias.

    The bias tables are gathered, not multiplied, but the four terms are summed once per forward
    (3 H l^2 additions per sequence) and the bias is added to the scores in every layer use (H l^2);
    times 3 with backward. At D=768, H=12, 12 layers this is about 0.5% of the attention term."""
    from kompakt.models.lattice import num_embedding_rows

    lens = torch.as_tensor(seq_lens, dtype=torch.float64)
    D, U = cfg.hidden_size, layer_uses(cfg)
    squares = float((lens * lens).sum())
    attention = 12 * D * U * squares
    bias = 3 * (3 + U) * cfg.num_heads * squares
    head = D * D + D * num_embedding_rows(cfg)
    last = 6 * (D * D + 2 * D * cfg.intermediate_size) * last_layer_rows(cfg, num_predictions, lens.numel())
    return (6 * body_matmul_params(cfg) * float(lens.sum()) + last + attention + bias
            + 6 * head * num_predictions)


def window_pairs(lens: torch.Tensor, w: int) -> float:
    """Query-key pairs inside sequences of lengths `lens` when a token sees at most w positions each side:
    l^2 for l <= w + 1, else l (2w + 1) - w (w + 1) (the band, less its corners)."""
    lens = torch.as_tensor(lens, dtype=torch.float64)
    band = lens * (2 * w + 1) - w * (w + 1)
    return float(torch.where(lens <= w + 1, lens * lens, band).sum())


def modernbert_model_flops(cfg: ModelConfig, seq_lens: Sequence[int] | torch.Tensor,
                           num_predictions: int) -> float:
    """ModernBERT: per layer Wqkv 3 D^2 + Wo D^2 + GeGLU Wi 2 D F + Wo D F per token (the last layer past
    attention on the M masked rows only, as the model runs it); attention 12 D per query-key pair, all
    pairs of a sequence in the global layers and only the window's band in the local ones; the head's
    dense D^2 and tied decoder D V on the M rows."""
    from kompakt.models.modernbert import half_window, layer_is_global

    lens = torch.as_tensor(seq_lens, dtype=torch.float64)
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    n_global = sum(layer_is_global(cfg, i) for i in range(L))
    pairs = n_global * float((lens * lens).sum()) + (L - n_global) * window_pairs(lens, half_window(cfg))
    body = (L - 1) * (4 * D * D + 3 * D * F) + 3 * D * D
    last = (D * D + 3 * D * F) * num_predictions
    head = (D * D + D * cfg.vocab_size) * num_predictions
    return 6 * body * float(lens.sum()) + 6 * last + 12 * D * pairs + 6 * head
