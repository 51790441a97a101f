"""ModernBERT (Warner et al. 2024) on packed batches, with the parameter names of `transformers`'
`ModernBertModel` / `ModernBertForMaskedLM`, so export is a strict `load_state_dict` into the stock class.

The math is the stock model's: pre-LayerNorm blocks without biases (the first block has no attention
norm, the embeddings' norm stands in), rotary positions restarting at 0 in every packed sequence
(theta `global_rope_theta` in global layers, `local_rope_theta` in local ones), a GeGLU feed-forward
(`Wi` gives D -> 2F, GELU(first half) * second half, `Wo` F -> D), a final norm, and alternating
attention: layer i is global when i % global_attn_every_n_layers == 0 (or as an explicit
`layer_types` list says, e.g. after layer dropping), otherwise it sees only the tokens at most
local_attention // 2 positions away, inside its own sequence. The MLM head (dense, GELU, norm, then
the decoder tied to the token embeddings) runs on the masked rows only. Nothing pads: the local
window is one more mask of the packed attention plan (models/packing.py).

Legend: T tokens in the packed stream, M predicted positions, D hidden size, F GeGLU width, H heads,
K head size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kompakt.model_config import ModelConfig
from kompakt.models.bert import activation, finish, mlm_loss, record
from kompakt.models.packing import attend_qkv, plan_attention, position_ids_from_cu_seqlens


def layer_is_global(cfg: ModelConfig, i: int) -> bool:
    """Layer i's type: `modernbert.layer_types[i]` where given, else every n-th layer from the first is global."""
    if cfg.modernbert.layer_types is not None:
        return cfg.modernbert.layer_types[i] == "full_attention"
    return i % cfg.modernbert.global_attn_every_n_layers == 0


def half_window(cfg: ModelConfig) -> int:
    """How far a local layer sees on each side (HF's `sliding_window` = local_attention // 2)."""
    return cfg.modernbert.local_attention // 2


def init_weights(module: nn.Module, std: float) -> None:
    """N(0, std) truncated at 3 std for matrices and embeddings, zero biases, unit norms (as the stock init)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)


def rotary_cos_sin(position_ids_T: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, K) in fp32 for the positions, in the rotate-half layout of the stock model."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids_T.device, dtype=torch.float)
                                / head_dim))
    freqs_TK2 = position_ids_T[:, None].float() * inv_freq[None, :]
    emb_TK = torch.cat([freqs_TK2, freqs_TK2], dim=-1)
    return emb_TK.cos(), emb_TK.sin()


def apply_rotary(x_THK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    x = x_THK.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos_TK[:, None] + rotated * sin_TK[:, None]).to(x_THK.dtype)


class ModernBertEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)
        self.dropout = cfg.dropout

    def forward(self, input_ids_T: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.norm(self.tok_embeddings(input_ids_T)), self.dropout, self.training)


class ModernBertAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.Wqkv = nn.Linear(D, 3 * D, bias=False)
        self.Wo = nn.Linear(D, D, bias=False)


class ModernBertMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.Wi = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.Wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class ModernBertEncoderLayer(nn.Module):
    """x = x + attn(norm(x)); x = x + mlp(norm(x)); layer 0 has no attention norm."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        D = cfg.hidden_size
        self.attn_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps, bias=False) if index else nn.Identity()
        self.attn = ModernBertAttention(cfg)
        self.mlp_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps, bias=False)
        self.mlp = ModernBertMLP(cfg)
        self.is_global = layer_is_global(cfg, index)
        self.num_heads, self.act, self.dropout = cfg.num_heads, cfg.act, cfg.dropout

    def forward(self, x_TD: torch.Tensor, plan, rope: tuple[torch.Tensor, torch.Tensor],
                rows: torch.Tensor | None = None, tap: dict | None = None) -> torch.Tensor:
        T, D = x_TD.shape
        H = self.num_heads
        qkv_T3HK = self.attn.Wqkv(self.attn_norm(x_TD)).view(T, 3, H, D // H)
        q, k, v = qkv_T3HK.unbind(1)
        cos, sin = rope
        qkv_T3HK = torch.stack([apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v], 1)
        if tap is not None:
            tap["qkv"] = qkv_T3HK
        ctx_TD = attend_qkv(qkv_T3HK, plan, self.dropout if self.training else 0.0).reshape(T, D)
        if rows is not None:  # only the rows the heads read go on past attention (keys covered all T)
            x_TD, ctx_TD = x_TD[rows], ctx_TD[rows]
        x_TD = x_TD + F.dropout(self.attn.Wo(ctx_TD), self.dropout, self.training)
        h, gate = self.mlp.Wi(self.mlp_norm(x_TD)).chunk(2, dim=-1)
        h_TF = F.dropout(activation(self.act, h) * gate, self.dropout, self.training)
        return x_TD + F.dropout(self.mlp.Wo(h_TF), self.dropout, self.training)


class ModernBertModel(nn.Module):
    """The encoder: packed tokens in, (T, D) final-normed hidden states out (stock `ModernBertModel` keys)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = ModernBertEmbeddings(cfg)
        self.layers = nn.ModuleList(ModernBertEncoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)
        init_weights(self, cfg.initializer_range)

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None,
                position_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                output_rows: torch.Tensor | None = None, taps: list | None = None) -> torch.Tensor:
        """Hidden states (T, D), or only `output_rows` of them; `token_type_ids` are ignored (ModernBERT has none).
        `taps` as in BertModel: the embeddings' output, then each layer's (before the final norm)."""
        x_TD, run = self.begin(input_ids, cu_seqlens, max_seqlen, position_ids)
        record(taps, x_TD)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            tap = {} if taps is not None else None
            x_TD = run(layer, x_TD, output_rows if i == last else None, tap)
            record(taps, x_TD, tap)
        return self.end(x_TD)

    @property
    def layer_list(self) -> nn.ModuleList:
        return self.layers

    def begin(self, input_ids, cu_seqlens, max_seqlen=None, position_ids=None, token_type_ids=None):
        """(the embeddings' output, run) as BertModel.begin: `run(layer, x, rows, tap)` gives a layer the
        attention plan and rotary table of its own type (global or local), whichever position it runs at."""
        T = input_ids.shape[0]
        if position_ids is None:
            position_ids = position_ids_from_cu_seqlens(cu_seqlens, T)
        x_TD = self.embeddings(input_ids)
        opts, K = self.cfg.modernbert, self.cfg.hidden_size // self.cfg.num_heads
        made: dict[bool, tuple] = {}  # per layer type, built once on first use: (attention plan, rotary cos/sin)

        def run(layer, x, rows=None, tap=None):
            g = layer.is_global
            if g not in made:
                made[g] = (plan_attention(cu_seqlens, max_seqlen, T, self.cfg.attention, x.dtype,
                                          window=None if g else half_window(self.cfg)),
                           rotary_cos_sin(position_ids, K, opts.global_rope_theta if g else opts.local_rope_theta))
            return layer(x, *made[g], rows, tap)
        return x_TD, run

    def end(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x_TD)


class ModernBertPredictionHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=False)
        self.act = cfg.act

    def forward(self, x_MD: torch.Tensor) -> torch.Tensor:
        return self.norm(activation(self.act, self.dense(x_MD)))


class ModernBertForMaskedLM(nn.Module):
    """MLM pretraining with the head on masked rows; keys of the stock `ModernBertForMaskedLM`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = ModernBertModel(cfg)
        self.head = ModernBertPredictionHead(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        init_weights(self.head, cfg.initializer_range)
        nn.init.zeros_(self.decoder.bias)
        self.decoder.weight = self.model.embeddings.tok_embeddings.weight

    def mlm_head(self) -> nn.Module:
        """The head and decoder as one module (rows -> logits), for code that treats heads alike (distillation)."""
        return nn.Sequential(self.head, self.decoder)

    def forward(self, input_ids, cu_seqlens, mlm_positions, mlm_labels=None, max_seqlen=None,
                position_ids=None, token_type_ids=None) -> dict:
        x_MD = self.model(input_ids, cu_seqlens, max_seqlen, position_ids, output_rows=mlm_positions)
        logits_MV = self.decoder(self.head(x_MD))
        losses = {"mlm": mlm_loss(logits_MV, mlm_labels)} if mlm_labels is not None else {}
        return finish({"mlm_logits": logits_MV}, losses, mlm_positions.numel())

