"""Structured pruning of attention heads and FFN neurons by importance on real text.

`prune` reads a stock bert/albert/modernbert folder, scores heads and FFN neurons over `batches` (padded `(B, L)`
batches from compress.batches.text_batches), removes the least important and writes a stock folder
that `transformers.AutoModel.from_pretrained` loads with no remote code. No retraining: the caller
fine-tunes or distils afterwards.

Head importance, normalised per layer by its L2 norm and then ranked over all layers (Michel et al.
2019, "Are Sixteen Heads Really Better than One?", who found the per-layer normalisation essential):

- "taylor": I_h = sum over batches of |dL/dm_h|, with a mask m (all ones) multiplied into each head's
  context vector just before the attention output projection (a forward pre-hook on
  `attention.output.dense`, ALBERT `attention.dense`; transformers 5 removed the `head_mask`
  argument). L is the MLM loss on 15% of the real non-special tokens replaced by [MASK] when the
  folder has an MLM head. Without one (a sentence encoder such as all-MiniLM-L6-v2) L is the proxy
  sum over real tokens of ||final hidden state||^2: any loss that compares against the unpruned
  model's own output has gradient exactly 0 at m = 1, so the proxy measures first-order sensitivity
  of the output's energy instead. It does not see a change that keeps the norm, so prefer an MLM
  folder or "contribution" for sentence encoders.
- "contribution": the mean over real tokens of ||W_O[:, h] ctx_h||_2, the size of what head h adds
  to the residual stream through the output projection.

FFN neuron j of a layer scores mean over real tokens of |act_j| * ||W_out[:, j]||_2 (act after the
activation function). Every layer loses the same number of neurons, round(ffn_fraction *
intermediate_size) (Python's round, halves to even; 0.25 of 1536 is 384), so
`config.intermediate_size` describes every layer; the rows of the input projection and the columns
of the output projection are sliced out, which saves time and memory.

ModernBERT fuses query, key and value into one `Wqkv` (rows q, then k, then v, D each) and its GeGLU
input projection `Wi` gives 2F rows (the GELU half, then the gate half): a head is its rows in each third
of `Wqkv`, and neuron j is row j and row F + j of `Wi` with column j of `Wo`. No biases.

ALBERT's layers are shared: a physical layer is `albert_layer_groups[g].albert_layers[j]`, index
g * inner_group_num + j, run once per use of its group; importances are summed over its uses and a
pruned head or neuron is gone from every use.

Heads and transformers 5: stock `BertSelfAttention`/`AlbertAttention` size query/key/value as
num_attention_heads * head_size from the config, and transformers 5 dropped `prune_heads` and the
`pruned_heads` config key, so a stock folder cannot hold a layer with fewer heads. Where the installed
transformers still has `PreTrainedModel.prune_heads` (4.x), heads are removed physically through it.
Otherwise their query/key/value rows and output-projection columns are zeroed, so they contribute
exactly nothing, and they are listed in config.json as `kompakt_pruned_heads`: the model is as large
and as fast as before; only FFN pruning saves compute there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kompakt.compress.layerdrop import load_teacher, num_params, read_config, save_student
from kompakt.errors import ConfigError, DataError

IMPORTANCE = ("taylor", "contribution")
MASK_RATE = 0.15


@dataclass
class Block:
    """One physical transformer layer's prunable linears (ALBERT: a shared layer).

    `qkv` is (linear, first row) for query, key and value: three linears at row 0 (BERT, ALBERT) or
    ModernBERT's fused Wqkv three times, at rows 0, D and 2D. `gated`: `ffn_in` holds 2F rows, F per half."""

    qkv: tuple[tuple[nn.Linear, int], ...]
    attn_out: nn.Linear
    ffn_in: nn.Linear
    ffn_out: nn.Linear
    owner: nn.Module  # the module holding ffn_in/ffn_out, for replacing them
    ffn_in_name: str
    ffn_out_name: str
    gated: bool = False


def blocks(model: nn.Module) -> list[Block]:
    """The physical layers in order (BERT, ModernBERT: layer i; ALBERT: group g's layer j at g * inner + j)."""
    out = []
    if model.config.model_type == "modernbert":
        D = model.config.hidden_size
        for layer in model.base_model.layers:
            w = layer.attn.Wqkv
            out.append(Block(((w, 0), (w, D), (w, 2 * D)), layer.attn.Wo, layer.mlp.Wi, layer.mlp.Wo, layer.mlp,
                             "Wi", "Wo", gated=True))
        return out
    enc = model.base_model.encoder
    if model.config.model_type == "bert":
        for layer in enc.layer:
            s = layer.attention.self
            out.append(Block(((s.query, 0), (s.key, 0), (s.value, 0)), layer.attention.output.dense,
                             layer.intermediate.dense, layer.output.dense, layer, "intermediate.dense", "output.dense"))
    else:
        for group in enc.albert_layer_groups:
            for layer in group.albert_layers:
                a = layer.attention
                out.append(Block(((a.query, 0), (a.key, 0), (a.value, 0)), a.dense, layer.ffn, layer.ffn_output,
                                 layer, "ffn", "ffn_output"))
    return out


def _check_batches(batches) -> int:
    if not batches:
        raise DataError("prune scores heads and neurons on real text; batches is empty "
                        "(build them with compress.batches.text_batches)")
    missing = [k for k in ("input_ids", "attention_mask") if k not in batches[0]]
    if missing:
        raise DataError(f"batches lack {', '.join(missing)}; build them with compress.batches.text_batches")
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    if tokens == 0:
        raise DataError("the batches hold no real tokens (attention_mask is all 0); pass tokenised text")
    return tokens


def _forward(base: nn.Module, batch: dict, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    types = {} if base.config.model_type == "modernbert" else {"token_type_ids": batch.get("token_type_ids")}
    out = base(input_ids=batch["input_ids"] if input_ids is None else input_ids,
               attention_mask=batch["attention_mask"], **types)
    return out.last_hidden_state


def _mlm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The stock MLM head on the given rows only (not on every position)."""
    # BertForMaskedLM and BertForPreTraining both hold the LM head at cls.predictions; ALBERT at predictions;
    # ModernBertForMaskedLM at head, then decoder.
    kind = model.config.model_type
    if kind == "modernbert":
        return model.decoder(model.head(hidden))
    return model.predictions(hidden) if kind == "albert" else model.cls.predictions(hidden)


def _mask_tokens(batch: dict, mask_token_id: int, special_ids, gen: torch.Generator):
    """15% of the real non-special tokens replaced by [MASK]: (masked input_ids, selected positions)."""
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    candidates = real & ~torch.isin(ids, torch.tensor(sorted(special_ids), dtype=ids.dtype))
    r = torch.rand(ids.shape, generator=gen)
    r[~candidates] = 2.0
    sel = r < MASK_RATE
    if not sel.any() and candidates.any():
        # A batch of a few short rows may draw none; one masked token keeps its gradient in the sum.
        sel.view(-1)[r.view(-1).argmin()] = True
    # All [MASK], no 80/10/10: the score is the head's role in predicting masked tokens, and random
    # replacements would only add noise over a few hundred rows.
    return ids.masked_fill(sel, mask_token_id), sel


def head_importance(model: nn.Module, batches: list[dict], *, kind: str = "taylor",
                    mask_token_id: int | None = None, special_ids=(), seed: int = 0) -> torch.Tensor:
    """Raw (unnormalised) importance of every head: a (num_physical_layers, num_heads) float64 tensor.

    `kind` "taylor" uses the MLM loss when `mask_token_id` is given and the model has an MLM head,
    else the hidden-norm proxy (module docstring); "contribution" is the mean output-projection norm.
    A head whose value weights and bias are zero scores exactly 0 under both. Put `model` in eval
    mode first (load_teacher does): dropout would make the scores random.
    """
    _check_batches(batches)
    bl = blocks(model)
    num_heads = model.config.num_attention_heads
    head_size = bl[0].attn_out.in_features // num_heads
    scores = torch.zeros(len(bl), num_heads, dtype=torch.float64)
    base = model.base_model
    use_mlm = kind == "taylor" and mask_token_id is not None and base is not model
    state = {"real": None}

    if kind == "taylor":
        masks = [torch.ones(num_heads, requires_grad=True) for _ in bl]

        def make_hook(p):
            def hook(module, args):
                x = args[0]
                x = (x.reshape(*x.shape[:-1], num_heads, head_size) * masks[p].view(num_heads, 1)).flatten(-2)
                return (x,) + tuple(args[1:])
            return hook
    elif kind == "contribution":
        def make_hook(p):
            def hook(module, args):
                ctx = args[0][state["real"]].reshape(-1, num_heads, head_size)
                w = module.weight.view(module.out_features, num_heads, head_size)
                # ||W_O[:, h] ctx_h|| per token and head; summed over tokens here, divided by the count below.
                scores[p] += torch.einsum("thd,ohd->tho", ctx, w).norm(dim=-1).double().sum(0)
            return hook
    else:
        raise ConfigError(f"importance={kind!r} is not one of {', '.join(IMPORTANCE)}")

    requires = [p.requires_grad for p in model.parameters()]
    handles = [b.attn_out.register_forward_pre_hook(make_hook(p)) for p, b in enumerate(bl)]
    gen = torch.Generator().manual_seed(seed)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        tokens = 0
        for batch in batches:
            real = batch["attention_mask"].bool()
            state["real"] = real
            tokens += int(real.sum())
            if kind == "contribution":
                with torch.no_grad():
                    _forward(base, batch)
                continue
            with torch.enable_grad():
                if use_mlm:
                    ids, sel = _mask_tokens(batch, mask_token_id, special_ids, gen)
                    hidden = _forward(base, batch, ids)
                    logits = _mlm_logits(model, hidden[sel])
                    loss = nn.functional.cross_entropy(logits, batch["input_ids"][sel])
                else:
                    hidden = _forward(base, batch)
                    loss = hidden[real].pow(2).sum()
                grads = torch.autograd.grad(loss, masks)
            for p, g in enumerate(grads):
                scores[p] += g.abs().double()
        if kind == "contribution":
            scores /= tokens
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return scores


@torch.no_grad()
def ffn_importance(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """Importance of every FFN neuron: a (num_physical_layers, intermediate_size) float64 tensor.

    Neuron j scores mean over real tokens of |act_j| * ||W_out[:, j]||_2 (ALBERT: summed over the
    uses of the shared layer). A neuron whose output column is zero scores exactly 0.
    """
    tokens = _check_batches(batches)
    bl = blocks(model)
    sums = [torch.zeros(b.ffn_out.in_features, dtype=torch.float64) for b in bl]
    state = {"real": None}

    def make_hook(p):
        def hook(module, args):
            sums[p].add_(args[0][state["real"]].abs().double().sum(0))
        return hook

    handles = [b.ffn_out.register_forward_pre_hook(make_hook(p)) for p, b in enumerate(bl)]
    try:
        for batch in batches:
            state["real"] = batch["attention_mask"].bool()
            _forward(model.base_model, batch)
    finally:
        for h in handles:
            h.remove()
    col_norm = [b.ffn_out.weight.double().norm(dim=0) for b in bl]
    return torch.stack([s / tokens * c for s, c in zip(sums, col_norm)])


def _sliced(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `linear` keeping output rows (dim 0) or input columns (dim 1) `index`."""
    w = linear.weight.detach().index_select(dim, index).clone()
    out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, dtype=w.dtype, device=w.device)
    out.weight.data.copy_(w)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.detach().index_select(0, index) if dim == 0 else linear.bias.detach())
    return out


def slice_ffn(model: nn.Module, kept: list[list[int]]) -> None:
    """Keep FFN neurons `kept[p]` (one count for every physical layer p); update config.intermediate_size."""
    bl = blocks(model)
    assert len(kept) == len(bl) and len({len(k) for k in kept}) == 1, "one equal-length keep list per layer"
    for b, k in zip(bl, kept):
        index = torch.tensor(sorted(k), dtype=torch.long)
        rows = torch.cat([index, index + b.ffn_out.in_features]) if b.gated else index
        for name, linear, dim, idx in ((b.ffn_in_name, b.ffn_in, 0, rows), (b.ffn_out_name, b.ffn_out, 1, index)):
            parent = b.owner.get_submodule(name.rpartition(".")[0]) if "." in name else b.owner
            setattr(parent, name.rpartition(".")[2], _sliced(linear, idx, dim))
    model.config.intermediate_size = len(kept[0])


@torch.no_grad()
def zero_heads(model: nn.Module, heads: dict[int, list[int]]) -> None:
    """Zero heads' query/key/value rows and biases and their output-projection columns: they add exactly 0."""
    bl = blocks(model)
    num_heads = model.config.num_attention_heads
    size = bl[0].attn_out.in_features // num_heads
    for p, hs in heads.items():
        for h in hs:
            for lin, first in bl[p].qkv:
                rows = slice(first + h * size, first + (h + 1) * size)
                lin.weight[rows] = 0
                if lin.bias is not None:
                    lin.bias[rows] = 0
            bl[p].attn_out.weight[:, slice(h * size, (h + 1) * size)] = 0


def _choose_heads(norm: torch.Tensor, num_prune: int, already: dict[int, set[int]]) -> dict[int, list[int]]:
    """Lowest-scoring heads over all layers, `already` pruned ones first, never a layer's last head."""
    num_layers, num_heads = norm.shape
    chosen = {p: set(already.get(p, ())) for p in range(num_layers)}
    count = sum(len(s) for s in chosen.values())
    order = torch.argsort(norm.flatten(), stable=True).tolist()
    for flat in order:
        if count >= num_prune:
            break
        p, h = divmod(flat, num_heads)
        if h in chosen[p] or len(chosen[p]) >= num_heads - 1:
            continue
        chosen[p].add(h)
        count += 1
    return {p: sorted(s) for p, s in chosen.items()}


def _normalise(scores: torch.Tensor) -> torch.Tensor:
    """Each layer's scores divided by their L2 norm (Michel et al. 2019); an all-zero layer stays 0."""
    return scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-30)


def prune(teacher_dir: str | Path, out_dir: str | Path, *, heads_fraction: float = 0.0,
          ffn_fraction: float = 0.0, batches: list[dict], importance: str = "taylor") -> dict:
    """Prune `heads_fraction` of all attention heads and `ffn_fraction` of every layer's FFN neurons.

    Scores come from `batches` (see the module docstring for `importance` "taylor" and "contribution");
    `out_dir` gets a stock folder (config.json, model.safetensors in the teacher's dtype, the teacher's
    tokenizer files; an MLM head is kept). `heads_fraction` counts heads of the result over all
    physical layers, including heads an earlier prune already zeroed; each layer keeps at least one.
    Returns what goes into the model card: pruned heads per physical layer, FFN neurons kept per
    layer and the pruned ones, normalised head scores, FFN score summaries, parameter counts,
    `sparsity` (weights removed or zeroed / the teacher's encoder weights) and a note on head pruning.
    """
    import transformers

    teacher_dir = Path(teacher_dir)
    config = read_config(teacher_dir)
    for key, value in (("heads_fraction", heads_fraction), ("ffn_fraction", ffn_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value!r} must be a fraction in [0, 1)")
    if importance not in IMPORTANCE:
        raise ConfigError(f"importance={importance!r} is not one of {', '.join(IMPORTANCE)}")
    if heads_fraction == 0 and ffn_fraction == 0:
        raise ConfigError("heads_fraction and ffn_fraction are both 0: nothing to prune; "
                          "set at least one above 0")
    num_heads = config.num_attention_heads
    inner = getattr(config, "inner_group_num", 1)
    num_physical = (config.num_hidden_groups * inner if config.model_type == "albert"
                    else config.num_hidden_layers)
    total_heads = num_physical * num_heads
    num_heads_pruned = round(heads_fraction * total_heads)
    if num_heads_pruned > num_physical * (num_heads - 1):
        raise ConfigError(f"heads_fraction={heads_fraction} prunes {num_heads_pruned} of {total_heads} "
                          f"heads, but each of the {num_physical} layers must keep one of its {num_heads}: "
                          f"heads_fraction at most {(num_heads - 1) / num_heads:.4g}")
    num_ffn_pruned = round(ffn_fraction * config.intermediate_size)
    if num_ffn_pruned >= config.intermediate_size:
        raise ConfigError(f"ffn_fraction={ffn_fraction} prunes all {config.intermediate_size} FFN neurons "
                          "of a layer; lower it so at least one stays")
    # A fraction that rounds to nothing would silently write the teacher back unchanged.
    if heads_fraction > 0 and num_heads_pruned == 0:
        raise ConfigError(f"heads_fraction={heads_fraction} of {total_heads} heads rounds to 0 heads; "
                          f"use at least {1 / total_heads:.4g} or 0")
    if ffn_fraction > 0 and num_ffn_pruned == 0:
        raise ConfigError(f"ffn_fraction={ffn_fraction} of {config.intermediate_size} FFN neurons rounds "
                          f"to 0; use at least {1 / config.intermediate_size:.4g} or 0")
    _check_batches(batches)

    teacher = load_teacher(teacher_dir)
    model = teacher.model
    params_before = num_params(model)
    encoder_params = num_params(model.base_model.layers if teacher.model_type == "modernbert"
                                else model.base_model.encoder)
    hidden = config.hidden_size
    head_size = blocks(model)[0].attn_out.in_features // num_heads
    info = {"method": "prune", "model_type": teacher.model_type, "head": teacher.head,
            "importance": importance,
            "heads_fraction": heads_fraction, "ffn_fraction": ffn_fraction,
            "reference": ("heads: Michel et al. 2019 (arXiv:1905.10650); "
                          "FFN: |activation| x output-column norm"),
            "layers": ("physical layers: encoder.layer[i]" if teacher.model_type == "bert" else
                       "physical layers: layers[i]" if teacher.model_type == "modernbert" else
                       f"physical layers: group g, inner layer j at g * {inner} + j (shared over uses)")}

    # Score everything on the teacher before changing any weight.
    head_scores = ffn_scores = None
    loss_name = None
    if num_heads_pruned:
        mask_id, special = None, ()
        if importance == "taylor" and teacher.head != "base":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(teacher_dir))
            mask_id, special = tok.mask_token_id, set(tok.all_special_ids)
        loss_name = None if importance != "taylor" else (
            "mlm (15% of real tokens masked)" if mask_id is not None
            else "proxy: sum of squared final hidden-state norms")
        head_scores = _normalise(head_importance(model, batches, kind=importance, mask_token_id=mask_id,
                                                 special_ids=special))
    if num_ffn_pruned:
        ffn_scores = ffn_importance(model, batches)

    pruned_heads = {p: [] for p in range(num_physical)}
    params_zeroed = 0
    # transformers 4.x still removes heads physically; 5.x has no prune_heads (module docstring).
    physically = hasattr(transformers.PreTrainedModel, "prune_heads")
    if num_heads_pruned:
        already = {int(p): set(hs) for p, hs in (getattr(config, "kompakt_pruned_heads", None) or {}).items()}
        pruned_heads = _choose_heads(head_scores, num_heads_pruned, already)
        new = {p: [h for h in hs if h not in already.get(p, set())] for p, hs in pruned_heads.items()}
        new = {p: hs for p, hs in new.items() if hs}
        if physically:
            # transformers 4.x: smaller query/key/value and output projections, in config.pruned_heads.
            model.prune_heads(new)
        else:
            zero_heads(model, new)
            model.config.kompakt_pruned_heads = {str(p): hs for p, hs in pruned_heads.items() if hs}
            biases = 3 * head_size if blocks(model)[0].qkv[0][0].bias is not None else 0
            params_zeroed = sum(len(hs) for hs in new.values()) * (4 * head_size * hidden + biases)
        info["head_loss"] = loss_name
        info["head_importance"] = [[round(float(x), 6) for x in row] for row in head_scores]
    info["pruned_heads"] = {str(p): hs for p, hs in pruned_heads.items()}
    info["heads_kept_per_layer"] = [num_heads - len(pruned_heads[p]) for p in range(num_physical)]
    info["heads_removed_physically"] = physically and bool(num_heads_pruned)
    if num_heads_pruned and not physically:
        info["note"] = ("transformers 5 cannot load a layer with fewer heads (no prune_heads, no "
                        "pruned_heads config key), so the pruned heads are zeroed in place: they contribute "
                        "exactly nothing but are still stored and computed, so head pruning here saves "
                        "neither time nor memory; FFN pruning does. "
                        "The pruned heads are listed in config.json as kompakt_pruned_heads.")

    keep = config.intermediate_size - num_ffn_pruned
    pruned_neurons = [[] for _ in range(num_physical)]
    if num_ffn_pruned:
        kept = []
        for p, row in enumerate(ffn_scores):
            order = torch.argsort(row, stable=True)
            pruned_neurons[p] = sorted(order[:num_ffn_pruned].tolist())
            kept.append(sorted(order[num_ffn_pruned:].tolist()))
        slice_ffn(model, kept)
        info["ffn_importance"] = [
            {"min": round(float(row.min()), 6), "mean": round(float(row.mean()), 6),
             "max": round(float(row.max()), 6),
             "largest_pruned": round(float(row[pruned_neurons[p]].max()), 6)}
            for p, row in enumerate(ffn_scores)]
    info["ffn_neurons_kept_per_layer"] = [keep] * num_physical
    info["ffn_pruned_neurons"] = pruned_neurons

    params_after = num_params(model)
    removed = params_before - params_after
    info.update(num_params_before=params_before, num_params_after=params_after, params_removed=removed,
                params_zeroed=params_zeroed, encoder_params_before=encoder_params,
                sparsity=round((removed + params_zeroed) / encoder_params, 6))
    save_student(model, teacher, out_dir)
    return info
