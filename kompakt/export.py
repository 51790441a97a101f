"""Export of any training checkpoint to a Hugging Face folder with a model card (`kompakt export`).

A checkpoint's `train_state.json` names the model (`model`), the tokenizer folder, and what the
card shows: `card` rows written by the training stage, `release` (Hub metadata and the data's
licence and attribution, from the recipe's `release` section), the final losses and the held-out
loss. The family's registered exporter (kompakt/families.py) writes the folder, so stock
`transformers` loads it with `AutoModel`/`AutoModelForMaskedLM` and no remote code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kompakt import checkpoint, families
from kompakt.errors import DataError
from kompakt.model_config import ModelConfig
from kompakt.runs import read_manifest


def load_weights(tag_dir: Path, model: torch.nn.Module) -> None:
    """Whole fp32 weights of a checkpoint into `model`: `model.safetensors` (ZeRO 0), `consolidated.pt`
    (ZeRO 1-2) or DeepSpeed's zero_to_fp32 (ZeRO 3)."""
    if (tag_dir / checkpoint.CONSOLIDATED).is_file():
        state = torch.load(tag_dir / checkpoint.CONSOLIDATED, weights_only=True)["params"]
    elif (tag_dir / checkpoint.WEIGHTS).is_file():
        from safetensors.torch import load_file

        state = load_file(str(tag_dir / checkpoint.WEIGHTS))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise DataError(f"{tag_dir}: weights do not fit the model of its train_state.json "
                        f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def _yaml_list(values) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def model_card(model_cfg: ModelConfig, state: dict, tokenizer_dir: Path) -> str:
    """README.md of an exported folder: Hub metadata, what was trained on what, for how long, with which result."""
    family = families.get(model_cfg.family)
    release = state.get("release") or {}
    losses = state.get("final_losses") or {}
    # The card is published: name the stage by its hash, not by this machine's path.
    tok_stage = Path(state.get("tokenizer_stage", tokenizer_dir.parent))
    counts = (read_manifest(tok_stage) or {}).get("counts", {})
    data = (f"{counts.get('num_docs', 0):,} documents, {counts.get('num_tokens', 0):,} tokens "
            f"(stage `{tok_stage.name}`)")
    meta = ["library_name: transformers", f"pipeline_tag: {family.pipeline_tag}",
            f"tags: {_yaml_list(['kompakt', model_cfg.family, family.pipeline_tag, *release.get('tags', [])])}"]
    if release.get("language"):
        meta.append(f"language: {_yaml_list(release['language'])}")
    if release.get("license"):
        meta.append(f"license: {release['license']}")
    if release.get("datasets"):
        meta.append(f"datasets: {_yaml_list(release['datasets'])}")
    rows = [("data", data)]
    if release.get("data_license") or release.get("data_attribution"):
        rows.append(("data licence", " - ".join(x for x in (release.get("data_license"),
                                                           release.get("data_attribution")) if x)))
    rows.append(("tokenizer", f"{state.get('vocab_size')} tokens, shipped in this folder (stage `{tok_stage.name}`)"))
    rows += [tuple(r) for r in state.get("card", [])]
    rows += [("size", f"{model_cfg.num_layers} layers, hidden {model_cfg.hidden_size}, {model_cfg.num_heads} heads, "
                      f"{state.get('num_params', 0):,} parameters"),
             ("steps", f"{state['step']:,}"), ("tokens seen", f"{state['tokens_seen']:,}")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    loss_lines = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(losses.items())) or "| - | - |"
    heads = [k.removeprefix("loss_") for k in sorted(losses) if k != "loss"] or list(family.heads)
    eval_loss = state.get("eval_loss")
    eval_text = f"{eval_loss:.4f}" if isinstance(eval_loss, (int, float)) else "not measured"
    load = ("`transformers.AutoModelForMaskedLM.from_pretrained(path)`" if family.hf_model_type != "lattice-bert"
            else "`kompakt.register_hf()` and then `transformers.AutoModelForMaskedLM.from_pretrained(path)`")
    return f"""---
{chr(10).join(meta)}
---
# {state.get('recipe', 'kompakt')} ({model_cfg.family})

A compact {model_cfg.family} encoder pretrained with kompakt.

| | |
|---|---|
{table}

Final training losses (mean over the last logging interval; `loss` is the sum of the objectives):

| objective | loss |
|---|---|
{loss_lines}

Held-out loss, summed over the objectives ({' + '.join(heads)}) as in training, on held-out documents: {eval_text}

Load with {load}.
"""


def export_checkpoint(tag_dir: Path, out_dir: Path) -> Path:
    """A complete checkpoint -> a Hugging Face folder with tokenizer and model card (atomic)."""
    from kompakt.models import build_pretraining_model

    tag_dir = Path(tag_dir)
    state = checkpoint.read_train_state(tag_dir)
    model_cfg = ModelConfig.model_validate(state["model"])
    tokenizer_dir = Path(state["tokenizer_dir"])
    model = build_pretraining_model(model_cfg)
    load_weights(tag_dir, model)
    card = model_card(model_cfg, state, tokenizer_dir)
    exporter = families.get(model_cfg.family).resolve("export")
    return exporter(model.eval(), out_dir, tokenizer_dir=tokenizer_dir, model_card=card)
