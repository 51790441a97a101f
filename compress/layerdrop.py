"""Layer dropping without retraining: "Poor Man's BERT" (Sajjad et al. 2020, arXiv:2004.03844).

`drop_layers` reads a stock Hugging Face folder (bert, albert or modernbert; or a Lattice-BERT folder, whose
classes `kompakt.register_hf()` registers with the Auto classes), removes `num_drop` transformer
layers chosen by one of the paper's strategies and writes a stock folder that
`transformers.AutoModel.from_pretrained` loads with no remote code. The paper fine-tunes after
dropping; this module only drops, the caller fine-tunes or distils.

Strategies, for a teacher of N layers and K = `num_drop` (the paper counts layers 1..N from the
bottom; kept and dropped indices here are 0-based, so the paper's layer n is index n - 1):

- "top": drop the last K layers (the paper's best strategy for BERT: the lower layers carry most of
  what downstream tasks need).
- "bottom": drop the first K layers.
- "alternate": the paper's odd-alternate dropping, every other layer from the top starting one below
  the top: 1-based layers N-1, N-3, ..., N-2K+1, so 12 layers and K=4 drop 11, 9, 7, 5 (0-based 10, 8,
  6, 4). The top layer is kept. K can be at most N // 2.
- "symmetric": drop a block of K consecutive layers from the middle, keeping the bottom and the top:
  0-based indices (N-K)//2 ... (N-K)//2 + K - 1 (12 layers, K=4: 1-based 5..8); when N-K is odd the
  extra kept layer is on top.
- "contribution": drop the K layers that change their input least, measured on real text: the mean
  cosine similarity between a layer's input and output hidden states over real (non-padding) tokens;
  the highest similarity is dropped first. Needs `batches`.

ALBERT shares weights: its N "layers" are N uses of `num_hidden_groups` groups (each use runs the
group's `inner_group_num` layers), with use i running group int(i / (N / G)). Dropping a use lowers
`num_hidden_layers`; a group no use runs any more is removed. With one group every use runs the same
weights, so any strategy gives the same model (only K matters). With several groups the result must
keep HF's uniform use-to-group mapping, or stock ALBERT would run the wrong group; a dropped set
that breaks it raises ConfigError.

ModernBERT: the kept layers keep their attention type (global or local), written as the stock config's
explicit `layer_types` list, so a dropped global layer does not turn a local one global. Its first layer
has no attention norm (the embeddings' norm stands in), and a stock model builds its layer 0 that way,
so a choice that drops layer 0 (bottom, or alternate down to it) is refused; contribution never picks it.

`load_teacher` and `save_student` are the folder I/O that compress/prune.py shares.
"""

from __future__ import annotations

import difflib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kompakt.errors import ConfigError, DataError
from kompakt.hf import TOKENIZER_FILES
from kompakt.log import warn

STRATEGIES = ("top", "bottom", "alternate", "symmetric", "contribution")
MODEL_TYPES = ("bert", "albert", "modernbert", "lattice-bert")

# Weight-name prefixes that mark a head in a stock checkpoint (the base model's keys may carry a
# "bert."/"albert." prefix or none, so these are matched anywhere in the name).
_MLM_KEYS = ("cls.predictions.", "predictions.")
_PRETRAINING_KEYS = ("cls.seq_relationship.", "sop_classifier.")
_MODERNBERT_MLM_KEYS = ("head.", "decoder.")  # ModernBertForMaskedLM's head, at the top level


@dataclass
class Teacher:
    """A loaded teacher folder: the stock model (fp32, eval mode) and what it was saved as."""

    model: nn.Module
    folder: Path
    model_type: str
    head: str  # "base", "masked_lm" or "pretraining"
    dtype: torch.dtype  # the dtype of the stored weights, written back on save


def read_config(teacher_dir: str | Path):
    """The teacher's `AutoConfig`; ConfigError for a model type other than bert/albert/modernbert."""
    from transformers import AutoConfig

    folder = Path(teacher_dir)
    path = folder / "config.json"
    if not path.is_file():
        raise DataError(f"{folder} has no config.json; pass a Hugging Face model folder")
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise DataError(f"{path} is not a JSON object ({err}); pass a Hugging Face model folder") from None
    if model_type is None:
        raise DataError(f"{path} has no model_type; pass a folder saved by transformers' save_pretrained")
    # Checked before AutoConfig, which fails with a traceback on a model type transformers does not know.
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"teacher {folder} is a {model_type} model; compress supports {', '.join(MODEL_TYPES)}")
    if model_type == "lattice-bert":  # kompakt's own classes, registered with AutoConfig and the Auto models
        import kompakt

        kompakt.register_hf()
    return AutoConfig.from_pretrained(str(folder))


def load_teacher(teacher_dir: str | Path) -> Teacher:
    """Load a stock bert/albert/modernbert folder with the class its weights fit, keeping any MLM head.

    The class comes from the weight names, not from `architectures` (which a hand-edited or
    sentence-transformers folder may not state): NSP/SOP weights -> `AutoModelForPreTraining`, MLM
    head weights -> `AutoModelForMaskedLM`, neither -> `AutoModel` (with a pooler only if the folder
    has one). Weights are read from `model.safetensors` only (DESIGN section 5).
    """
    from safetensors import safe_open
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining

    folder = Path(teacher_dir)
    config = read_config(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise DataError(f"{folder} has no model.safetensors; re-save the teacher with save_pretrained "
                        "(compress reads safetensors only)")
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
        if not keys:
            raise DataError(f"{weights} holds no tensors; re-save the teacher with save_pretrained")
        dtype = f.get_slice(next((k for k in keys if "word_embeddings" in k or "tok_embeddings" in k),
                                 keys[0])).get_dtype()
    stored_dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(dtype, torch.float32)
    kwargs = {}
    if any(p in k for k in keys for p in _PRETRAINING_KEYS):
        head, cls = "pretraining", AutoModelForPreTraining
    elif any(p in k for k in keys for p in _MLM_KEYS) or (
            config.model_type == "modernbert" and any(k.startswith(_MODERNBERT_MLM_KEYS) for k in keys)):
        head, cls = "masked_lm", AutoModelForMaskedLM
    else:
        head, cls = "base", AutoModel
        if config.model_type != "modernbert":  # ModernBERT has no pooler
            kwargs["add_pooling_layer"] = any("pooler" in k for k in keys)
    # fp32 for the scoring passes whatever the stored dtype; save_student casts back.
    model, report = cls.from_pretrained(str(folder), config=config, dtype=torch.float32,
                                        output_loading_info=True, **kwargs)
    if report["missing_keys"]:
        raise DataError(f"{folder}/model.safetensors lacks weights a stock {type(model).__name__} needs "
                        f"({', '.join(sorted(report['missing_keys'])[:3])}, ...); pass a complete folder")
    if report["unexpected_keys"]:
        warn(f"{folder}: {len(report['unexpected_keys'])} weights that no stock {type(model).__name__} "
             f"holds are left out of the compressed model (e.g. {sorted(report['unexpected_keys'])[0]})")
    return Teacher(model=model.eval(), folder=folder, model_type=config.model_type, head=head,
                   dtype=stored_dtype)


def save_student(model: nn.Module, teacher: Teacher, out_dir: str | Path) -> None:
    """Write `model` as a stock folder in `out_dir`, in the teacher's dtype, with its tokenizer copied."""
    out = Path(out_dir)
    model.to(teacher.dtype).save_pretrained(str(out))
    found = [teacher.folder / name for name in TOKENIZER_FILES if (teacher.folder / name).is_file()]
    if not found:
        raise DataError(f"{teacher.folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                        "a compressed model needs the teacher's tokenizer beside it")
    for f in found:
        shutil.copy2(f, out / f.name)


def num_params(model: nn.Module) -> int:
    """Distinct parameters: tied and ALBERT-shared weights count once."""
    return sum(p.numel() for p in model.parameters())


def albert_group_of(use: int, num_uses: int, num_groups: int) -> int:
    """The group stock ALBERT runs at use `use` (AlbertTransformer.forward's float-division formula)."""
    return int(use / (num_uses / num_groups))


def choose_dropped(strategy: str, num_layers: int, num_drop: int,
                   scores: list[float] | None = None) -> list[int]:
    """0-based indices of the layers `strategy` drops from `num_layers` (see the module docstring)."""
    n, k = num_layers, num_drop
    if strategy == "top":
        return list(range(n - k, n))
    if strategy == "bottom":
        return list(range(k))
    if strategy == "alternate":
        # 1-based N-1, N-3, ... is 0-based N-2, N-4, ...
        return sorted(n - 2 - 2 * j for j in range(k))
    if strategy == "symmetric":
        start = (n - k) // 2
        return list(range(start, start + k))
    if strategy == "contribution":
        assert scores is not None and len(scores) == n
        # Stable sort on -similarity: among equal scores the lower layer is dropped first.
        order = sorted(range(n), key=lambda i: -scores[i])
        return sorted(order[:k])
    raise AssertionError(strategy)


def _check(strategy: str, num_drop: int, num_layers: int, teacher_dir: Path, batches, model_type: str) -> None:
    if strategy not in STRATEGIES:
        close = difflib.get_close_matches(strategy, STRATEGIES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"strategy={strategy!r} is not one of {', '.join(STRATEGIES)}{hint}")
    if isinstance(num_drop, bool) or not isinstance(num_drop, int) or not 1 <= num_drop < num_layers:
        raise ConfigError(f"num_drop={num_drop!r}: teacher {teacher_dir} has {num_layers} layers, so "
                          f"num_drop must be 1..{num_layers - 1} (at least one layer stays)")
    if strategy == "alternate" and num_drop > num_layers // 2:
        raise ConfigError(f"num_drop={num_drop}: alternate dropping removes every other layer, at most "
                          f"{num_layers // 2} of the teacher's {num_layers}; lower num_drop or use another "
                          "strategy")
    if model_type == "modernbert" and strategy != "contribution" and 0 in choose_dropped(strategy, num_layers, num_drop):
        raise ConfigError(f"strategy={strategy} with num_drop={num_drop} drops layer 0 of ModernBERT teacher "
                          f"{teacher_dir}, whose next layer would lose its attention norm in a stock ModernBERT "
                          "(layer 0 has none); use top, symmetric, contribution or a smaller num_drop")
    if strategy == "contribution" and not batches:
        raise ConfigError("strategy=contribution scores layers on real text; pass batches "
                          "(compress.batches.text_batches)")


def check_plan(teacher_dir: str | Path, strategy: str, num_drop: int, key: str = "layer_drop") -> None:
    """The checks `drop_layers` makes before loading any weights, for a caller that checks a whole recipe first
    (contribution's batches are the caller's to give, so they are not checked here)."""
    config = read_config(teacher_dir)
    try:
        _check(strategy, num_drop, config.num_hidden_layers, Path(teacher_dir), [None], config.model_type)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None


def _layer_modules(model: nn.Module, model_type: str) -> list[nn.Module]:
    """The modules run once per layer use, in order of use (ALBERT: one group module per use)."""
    if model_type == "modernbert":
        return list(model.base_model.layers)
    if model_type == "lattice-bert":  # the HF wrapper around kompakt's packed encoder
        return list(model.base_model.lattice.encoder.layer)
    enc = model.base_model.encoder
    if model_type == "bert":
        return list(enc.layer)
    n, g = model.config.num_hidden_layers, model.config.num_hidden_groups
    return [enc.albert_layer_groups[albert_group_of(i, n, g)] for i in range(n)]


@torch.no_grad()
def layer_similarity(model: nn.Module, model_type: str, batches: list[dict]) -> list[float]:
    """Mean cosine similarity between each layer use's input and output hidden states over real tokens.

    One entry per use (BERT: per layer; ALBERT: per use of a shared group), in order; near 1 means
    the layer barely changes its input. Padding positions (attention_mask 0) are left out.
    """
    n = model.config.num_hidden_layers
    sums = torch.zeros(n, dtype=torch.float64)
    tokens = 0
    state = {"use": 0, "real": None}

    def hook(module, args, output):
        x = args[0]
        y = output[0] if isinstance(output, tuple) else output
        real = state["real"] if x.dim() == 3 else slice(None)  # a packed (T, D) stream holds real tokens only
        cos = nn.functional.cosine_similarity(x[real], y[real], dim=-1)
        sums[state["use"]] += cos.double().sum()
        state["use"] += 1

    # A shared ALBERT group appears once per use in the list; hook each module object once.
    modules = {id(m): m for m in _layer_modules(model, model_type)}
    handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        base = model.base_model
        for batch in batches:
            state["use"], state["real"] = 0, batch["attention_mask"].bool()
            types = {} if model_type == "modernbert" else {"token_type_ids": batch.get("token_type_ids")}
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **types)
            assert state["use"] == n, (state["use"], n)
            tokens += int(state["real"].sum())
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise DataError("the batches hold no real tokens (attention_mask is all 0); pass tokenised text")
    return (sums / tokens).tolist()


def _remap_pruned_heads(config, old_to_new: dict[int, int]) -> None:
    """Keep a `kompakt_pruned_heads` record (compress/prune.py) pointing at the right physical layers."""
    pruned = getattr(config, "kompakt_pruned_heads", None)
    if pruned:
        config.kompakt_pruned_heads = {str(old_to_new[int(p)]): heads for p, heads in pruned.items()
                                       if int(p) in old_to_new}


def _drop_bert(model: nn.Module, kept: list[int]) -> None:
    if model.config.model_type == "lattice-bert":
        packed = model.base_model.lattice  # kompakt's encoder inside the HF wrapper; its config follows
        packed.encoder.layer = nn.ModuleList([packed.encoder.layer[i] for i in kept])
        packed.cfg = packed.cfg.model_copy(update={"num_layers": len(kept)})
        model.config.num_hidden_layers = len(kept)
        return
    enc = model.base_model.encoder
    enc.layer = nn.ModuleList([enc.layer[i] for i in kept])
    for new, layer in enumerate(enc.layer):
        # layer_idx only addresses a decoder's KV cache, but keep it truthful.
        layer.attention.self.layer_idx = new
    model.config.num_hidden_layers = len(kept)
    _remap_pruned_heads(model.config, {old: new for new, old in enumerate(kept)})


def _drop_modernbert(model: nn.Module, kept: list[int]) -> nn.Module:
    """A fresh stock model of the kept layers, each keeping its attention type; the weights moved over strictly."""
    import re

    config = model.config
    config = type(config).from_dict({**config.to_dict(), "num_hidden_layers": len(kept),
                                     "layer_types": [config.layer_types[i] for i in kept]})
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, value in model.state_dict().items():
        m = re.match(r"^((?:model\.)?layers\.)(\d+)\.(.*)$", key)
        if m is None:
            state[key] = value
        elif int(m[2]) in new_index:
            state[f"{m[1]}{new_index[int(m[2])]}.{m[3]}"] = value
    out = type(model)(config)
    out.load_state_dict(state, strict=True)
    _remap_pruned_heads(out.config, new_index)
    return out.eval()


def _drop_albert(model: nn.Module, kept: list[int], teacher_dir: Path, strategy: str) -> list[int]:
    """Fewer uses, groups no use runs removed; returns the kept groups (teacher indices)."""
    cfg = model.config
    n, g = cfg.num_hidden_layers, cfg.num_hidden_groups
    groups_of_kept = [albert_group_of(i, n, g) for i in kept]
    kept_groups = sorted(set(groups_of_kept))
    new_index = {old: new for new, old in enumerate(kept_groups)}
    wanted = [new_index[x] for x in groups_of_kept]
    got = [albert_group_of(i, len(kept), len(kept_groups)) for i in range(len(kept))]
    if wanted != got:
        raise ConfigError(f"strategy={strategy}: teacher {teacher_dir} is an ALBERT of {n} uses of {g} "
                          f"shared groups; keeping uses {kept} would run groups {groups_of_kept}, but stock "
                          f"ALBERT maps {len(kept)} uses onto {len(kept_groups)} groups uniformly as {got}; "
                          "choose a num_drop or strategy that drops the same number of uses from every group")
    enc = model.base_model.encoder
    enc.albert_layer_groups = nn.ModuleList([enc.albert_layer_groups[x] for x in kept_groups])
    cfg.num_hidden_layers, cfg.num_hidden_groups = len(kept), len(kept_groups)
    inner = cfg.inner_group_num
    _remap_pruned_heads(cfg, {old * inner + j: new * inner + j
                              for old, new in new_index.items() for j in range(inner)})
    return kept_groups


def drop_layers(teacher_dir: str | Path, out_dir: str | Path, *, strategy: str, num_drop: int,
                batches: list[dict] | None = None) -> dict:
    """Drop `num_drop` layers of the bert/albert/modernbert folder `teacher_dir` by `strategy`, writing `out_dir`.

    `batches` (padded `(B, L)` batches from compress.batches.text_batches) are needed by
    "contribution" only. `out_dir` gets `config.json` (num_hidden_layers updated), `model.safetensors`
    in the teacher's dtype with the kept layers' weights unchanged, and the teacher's tokenizer files;
    an MLM head is kept. Returns what goes into the model card: kept and dropped layer indices
    (0-based; ALBERT: uses), the similarity scores ("contribution", else None), parameter counts
    before and after, and for ALBERT the kept groups and a note.
    """
    teacher_dir = Path(teacher_dir)
    config = read_config(teacher_dir)
    num_layers = config.num_hidden_layers
    _check(strategy, num_drop, num_layers, teacher_dir, batches, config.model_type)
    teacher = load_teacher(teacher_dir)
    model = teacher.model
    params_before = num_params(model)
    scores = layer_similarity(model, teacher.model_type, batches) if strategy == "contribution" else None
    chosen_from = scores
    if scores is not None and teacher.model_type == "modernbert":  # layer 0 stays (module docstring)
        chosen_from = [float("-inf")] + scores[1:]
    dropped = choose_dropped(strategy, num_layers, num_drop, chosen_from)
    kept = [i for i in range(num_layers) if i not in dropped]
    info = {"method": "layerdrop", "reference": "Sajjad et al. 2020, Poor Man's BERT (arXiv:2004.03844)",
            "model_type": teacher.model_type, "head": teacher.head,
            "strategy": strategy, "num_drop": num_drop,
            "num_layers_before": num_layers, "num_layers_after": len(kept),
            "kept_layers": kept, "dropped_layers": dropped,
            "scores": None if scores is None else {"input_output_cosine": [round(s, 6) for s in scores]}}
    if teacher.model_type in ("bert", "lattice-bert"):
        _drop_bert(model, kept)
    elif teacher.model_type == "modernbert":
        info["layer_types"] = [config.layer_types[i] for i in kept]
        model = _drop_modernbert(model, kept)
    else:
        groups = config.num_hidden_groups
        info["groups_before"] = groups
        info["kept_groups"] = _drop_albert(model, kept, teacher_dir, strategy)
        if groups == 1:
            info["note"] = (f"ALBERT with one shared group: every use runs the same weights, so strategy "
                            f"{strategy} only means {len(kept)} uses instead of {num_layers}; the parameters "
                            "are unchanged and the saving is compute")
        else:
            info["note"] = (f"ALBERT: {len(kept)} uses of groups {info['kept_groups']} of the teacher's "
                            f"{groups}; use i runs group int(i / (num_hidden_layers / num_hidden_groups))")
    info["num_params_before"] = params_before
    info["num_params_after"] = num_params(model)
    save_student(model, teacher, out_dir)
    return info
