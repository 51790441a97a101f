"""BERT (NorBERT-style post-LN BERT) and SpanBERT on packed batches.

The math is that of Hugging Face's `BertModel`: post-LayerNorm blocks, exact erf GELU, learned
absolute positions (restarting at 0 in every packed sequence), token types, a tanh pooler on [CLS].
Module and parameter names equal HF's, so `state_dict()` keys match `BertModel`, `BertForMaskedLM` and
`BertForPreTraining` and export needs no renaming. Nothing here pads: the encoder runs on the flat
(T, D) stream and the MLM head only on the M gathered masked rows (see packing.py for attention).

Legend: T tokens in the packed stream, B sequences, M predicted (masked) positions, D hidden size,
E embedding width (D for BERT), H heads, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kompakt.model_config import ModelConfig
from kompakt.models.packing import attend_qkv, plan_attention, position_ids_from_cu_seqlens


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """HF's "gelu" is exact erf GELU; "gelu_new" is the tanh approximation (torch's approximate="tanh")."""
    return F.gelu(x, approximate="tanh" if name == "gelu_new" else "none")


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, std) for matrices and embeddings, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm; `width` is E (ALBERT) or D (BERT)."""

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, width)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.dropout = cfg.dropout

    def forward(self, input_ids_T, position_ids_T, token_type_ids_T) -> torch.Tensor:
        x_TE = (self.word_embeddings(input_ids_T) + self.position_embeddings(position_ids_T)
                + self.token_type_embeddings(token_type_ids_T))
        return F.dropout(self.LayerNorm(x_TE), self.dropout, self.training)


def self_attention(x_TD: torch.Tensor, query: nn.Linear, key: nn.Linear, value: nn.Linear, plan,
                   num_heads: int, dropout_p: float, tap: dict | None = None) -> torch.Tensor:
    """Multi-head self-attention inside each packed sequence; the context (T, D) before the output proj.

    With `tap` (a dict) the projected queries, keys and values are kept in it as `qkv` (T, 3, H, K):
    distillation's attention and relation losses read them (kompakt/compress)."""
    T, D = x_TD.shape
    if isinstance(query.weight, torch.Tensor):
        # One (D, 3D) matmul and one scatter instead of three; the weights stay HF's separate parameters.
        w_3DD = torch.cat([query.weight, key.weight, value.weight])
        b_3D = torch.cat([query.bias, key.bias, value.bias])
        qkv_T3HK = F.linear(x_TD, w_3DD, b_3D).view(T, 3, num_heads, D // num_heads)
    else:  # dynamically quantized int8 linears (torch.ao), whose packed weights do not concatenate
        qkv_T3HK = torch.stack([query(x_TD), key(x_TD), value(x_TD)], 1).view(T, 3, num_heads, D // num_heads)
    if tap is not None:
        tap["qkv"] = qkv_T3HK
    return attend_qkv(qkv_T3HK, plan, dropout_p).reshape(T, D)


def packed_inputs(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, position_ids, token_type_ids):
    """Default position ids (restarting per sequence) and token types (zeros) for a packed batch."""
    num_tokens = input_ids.shape[0]
    if position_ids is None:
        position_ids = position_ids_from_cu_seqlens(cu_seqlens, num_tokens)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    return position_ids, token_type_ids


def record(taps: list | None, x_TD: torch.Tensor, tap: dict | None = None) -> None:
    """Append a stage's output (and what its attention kept in `tap`) to `taps`, when taps are asked for.

    taps[0] is the embeddings' output (after ALBERT's mapping to D, as HF's `hidden_states[0]`),
    taps[i] the output of layer i (1-based) with its `qkv`; the same layout as HF's hidden states."""
    if taps is not None:
        taps.append({**(tap or {}), "hidden": x_TD})


def cls_rows(x_TD: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The first token ([CLS]) of every packed sequence, (B, D)."""
    return x_TD.index_select(0, cu_seqlens[:-1].long())


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertLayer(nn.Module):
    """One post-LN block: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)
        self.num_heads, self.act, self.dropout = cfg.num_heads, cfg.act, cfg.dropout

    def forward(self, x_TD: torch.Tensor, plan, rows: torch.Tensor | None = None,
                tap: dict | None = None) -> torch.Tensor:
        """(T, D) -> (T, D); with `rows`, only those rows go past attention and (len(rows), D) comes out."""
        sa, so = self.attention.self, self.attention.output
        ctx_TD = self_attention(x_TD, sa.query, sa.key, sa.value, plan, self.num_heads,
                                self.dropout if self.training else 0.0, tap)
        if rows is not None:
            # Indexing, not index_select: its backward measured 3-10x faster on CPU (index_put vs scatter_add).
            x_TD, ctx_TD = x_TD[rows], ctx_TD[rows]
        x_TD = so.LayerNorm(x_TD + F.dropout(so.dense(ctx_TD), self.dropout, self.training))
        h_TF = activation(self.act, self.intermediate.dense(x_TD))
        return self.output.LayerNorm(x_TD + F.dropout(self.output.dense(h_TF), self.dropout, self.training))


class BertEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))


class BertPooler(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x_TD: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_rows(x_TD, cu_seqlens)))


class BertModel(nn.Module):
    """The encoder: packed tokens in, (T, D) hidden states out (HF `BertModel`'s keys)."""

    def __init__(self, cfg: ModelConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg, cfg.hidden_size)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if add_pooling_layer else None
        init_weights(self, cfg.initializer_range)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None,
                position_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                output_rows: torch.Tensor | None = None, taps: list | None = None) -> torch.Tensor:
        """Hidden states (T, D), or only `output_rows` of them, (N, D).

        With `taps` (a list) it receives one dict per stage: `{"hidden"}` for the embeddings, then
        `{"hidden", "qkv"}` per layer (see `record`), for distillation.

        With `output_rows` (the rows the heads read: masked positions, [CLS]) the last layer runs its
        output projection and feed-forward on those rows only; its keys and values still cover all T
        tokens, so the result is exact. At 15% masking that skips about 85% of one layer's
        projection and feed-forward, 9 D^2 of every layer's 12 D^2 per token."""
        x_TD, run = self.begin(input_ids, cu_seqlens, max_seqlen, position_ids, token_type_ids)
        record(taps, x_TD)
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            tap = {} if taps is not None else None
            x_TD = run(layer, x_TD, output_rows if i == last else None, tap)
            record(taps, x_TD, tap)
        return x_TD

    @property
    def layer_list(self) -> nn.ModuleList:
        return self.encoder.layer

    def begin(self, input_ids, cu_seqlens, max_seqlen=None, position_ids=None, token_type_ids=None):
        """(the embeddings' output, run): `run(layer, x, rows=None, tap=None)` applies one of this encoder's
        layers to the packed batch. With `end` it lets code run the layers in its own order (BERT-of-Theseus)."""
        position_ids, token_type_ids = packed_inputs(input_ids, cu_seqlens, position_ids, token_type_ids)
        x_TD = self.embeddings(input_ids, position_ids, token_type_ids)
        plan = plan_attention(cu_seqlens, max_seqlen, x_TD.shape[0], self.cfg.attention, x_TD.dtype)
        return x_TD, lambda layer, x, rows=None, tap=None: layer(x, plan, rows, tap)

    def end(self, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD  # post-LN: the last layer's output is final


# ---------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = cfg.act

    def forward(self, x_MD: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(activation(self.act, self.dense(x_MD)))


class BertLMPredictionHead(nn.Module):
    """transform -> decoder tied to the word embeddings, with `bias` shared as the decoder's bias (as HF)."""

    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, x_MD: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x_MD))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)
        self.seq_relationship = nn.Linear(cfg.hidden_size, 2)


def mlm_loss(logits_MV: torch.Tensor, labels_M: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the M predicted positions, in fp32 whatever the compute dtype."""
    return F.cross_entropy(logits_MV.float(), labels_M)


def finish(out: dict, losses: dict, num_predictions: int) -> dict:
    """Fill the batch-contract keys: `loss` (sum of objectives), `losses`, `num_predictions`."""
    if losses:
        out["loss"] = sum(losses.values())
        out["losses"] = losses
    out["num_predictions"] = num_predictions
    return out


class BertForMaskedLM(nn.Module):
    """NorBERT-style pretraining: MLM only, the head on masked rows (keys of HF `BertForMaskedLM`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)
        init_weights(self.cls, cfg.initializer_range)

    def forward(self, input_ids, cu_seqlens, mlm_positions, mlm_labels=None, max_seqlen=None,
                position_ids=None, token_type_ids=None) -> dict:
        """Packed batch in (see kompakt.models), dict with loss, losses, num_predictions, mlm_logits out."""
        x_MD = self.bert(input_ids, cu_seqlens, max_seqlen, position_ids, token_type_ids, output_rows=mlm_positions)
        logits_MV = self.cls.predictions(x_MD)
        losses = {"mlm": mlm_loss(logits_MV, mlm_labels)} if mlm_labels is not None else {}
        return finish({"mlm_logits": logits_MV}, losses, mlm_positions.numel())


class BertForPreTraining(nn.Module):
    """MLM + next-sentence prediction, for parity with HF `BertForPreTraining` (same keys)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg, add_pooling_layer=True)
        self.cls = BertPreTrainingHeads(cfg, self.bert.embeddings.word_embeddings)
        init_weights(self.cls, cfg.initializer_range)

    def forward(self, input_ids, cu_seqlens, mlm_positions, mlm_labels=None, nsp_labels=None,
                max_seqlen=None, position_ids=None, token_type_ids=None) -> dict:
        """As BertForMaskedLM, plus `nsp_logits` (B, 2) and an "nsp" loss when `nsp_labels` is given."""
        M = mlm_positions.numel()
        rows = torch.cat([mlm_positions, cu_seqlens[:-1].long()])
        x_ND = self.bert(input_ids, cu_seqlens, max_seqlen, position_ids, token_type_ids, output_rows=rows)
        logits_MV = self.cls.predictions(x_ND[:M])
        nsp_B2 = self.cls.seq_relationship(torch.tanh(self.bert.pooler.dense(x_ND[M:])))
        losses = {}
        if mlm_labels is not None:
            losses["mlm"] = mlm_loss(logits_MV, mlm_labels)
        if nsp_labels is not None:
            losses["nsp"] = F.cross_entropy(nsp_B2.float(), nsp_labels)
        return finish({"mlm_logits": logits_MV, "nsp_logits": nsp_B2}, losses, mlm_positions.numel())


# ---------------------------------------------------------------------------------------------
# SpanBERT: BERT + span boundary objective (SBO)
# ---------------------------------------------------------------------------------------------


class SpanBoundaryHead(nn.Module):
    """Predicts each token of a masked span from the two boundary tokens x_{s-1}, x_{e+1} and a learned
    embedding of its position inside the span (clipped at max_span_length - 1): a two-layer
    feed-forward, each layer Linear -> GELU -> LayerNorm, then the tied vocabulary projection."""

    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        D = cfg.hidden_size
        self.max_span_length = cfg.max_span_length
        self.position_embeddings = nn.Embedding(cfg.max_span_length, D)
        self.dense1, self.LayerNorm1 = nn.Linear(3 * D, D), nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.dense2, self.LayerNorm2 = nn.Linear(D, D), nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.word_embeddings = [word_embeddings]  # a list, so its weight is not a second state_dict entry
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.act = cfg.act

    def forward(self, left_MD, right_MD, rel_M) -> torch.Tensor:
        """Logits (M, V) from the boundary hidden states (M, D) and the 0-based positions in the span (M,)."""
        rel_M = rel_M.clamp(max=self.max_span_length - 1)
        h_M3D = torch.cat([left_MD, right_MD, self.position_embeddings(rel_M)], dim=-1)
        h_MD = self.LayerNorm1(activation(self.act, self.dense1(h_M3D)))
        h_MD = self.LayerNorm2(activation(self.act, self.dense2(h_MD)))
        return F.linear(h_MD, self.word_embeddings[0].weight, self.bias)


class SpanBertForPreTraining(nn.Module):
    """SpanBERT: MLM on masked spans + SBO. Keys are BertForMaskedLM's plus `sbo.*` (dropped at export)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(cfg, self.bert.embeddings.word_embeddings)
        self.sbo = SpanBoundaryHead(cfg, self.bert.embeddings.word_embeddings)
        init_weights(self.cls, cfg.initializer_range)
        init_weights(self.sbo, cfg.initializer_range)

    def forward(self, input_ids, cu_seqlens, mlm_positions, sbo_left, sbo_right, sbo_rel, mlm_labels=None,
                max_seqlen=None, position_ids=None, token_type_ids=None) -> dict:
        """Loss = MLM + SBO, both averaged over the M masked positions."""
        rows = torch.cat([mlm_positions, sbo_left, sbo_right])
        x_ND = self.bert(input_ids, cu_seqlens, max_seqlen, position_ids, token_type_ids, output_rows=rows)
        x_MD, left_MD, right_MD = x_ND.chunk(3)
        logits_MV = self.cls.predictions(x_MD)
        sbo_MV = self.sbo(left_MD, right_MD, sbo_rel)
        losses = {}
        if mlm_labels is not None:
            losses = {"mlm": mlm_loss(logits_MV, mlm_labels), "sbo": mlm_loss(sbo_MV, mlm_labels)}
        return finish({"mlm_logits": logits_MV, "sbo_logits": sbo_MV}, losses, mlm_positions.numel())
