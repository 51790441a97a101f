"""BERT-of-Theseus (Xu et al. 2020): a predecessor whose layer modules are replaced, at random, by successors.

The predecessor's n layers form `num_successors` modules of k = n / num_successors consecutive layers;
successor i is one layer that stands in for module i. In a forward pass each module is replaced with
the probability the training step chooses (`replace`, one flag per module, drawn by the caller so the
draw follows the checkpointed RNG). The predecessor's layers are frozen; embeddings and the head are
shared and keep training, as in the paper. At export the successor alone is the student.

Any family whose encoder has `layer_list`, `begin` and `end` (BERT, SpanBERT, ModernBERT) works: a
ModernBERT successor copied from layer i keeps layer i's type (global or local attention), so the
successor's `modernbert.layer_types` are the first `num_successors` of the predecessor's
(`successor_config`); its first layer, like the stock model's, has no attention norm.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kompakt.model_config import ModelConfig
from kompakt.models.bert import mlm_loss
from kompakt.models.distill import encoder_and_head


def successor_config(cfg: ModelConfig, num_successors: int) -> ModelConfig:
    """The successor's config: the predecessor's with `num_successors` layers (ModernBERT: their types kept)."""
    update: dict = {"num_layers": num_successors}
    if cfg.family == "modernbert":
        from kompakt.models.modernbert import layer_is_global

        types = ["full_attention" if layer_is_global(cfg, i) else "sliding_attention" for i in range(num_successors)]
        update["modernbert"] = cfg.modernbert.model_copy(update={"layer_types": types})
    return ModelConfig.model_validate({**cfg.model_dump(), **update}, context={"any_vocab_size": True})


class TheseusModel(nn.Module):
    def __init__(self, predecessor: nn.Module, num_successors: int):
        super().__init__()
        encoder, head = encoder_and_head(predecessor)
        layers = encoder.layer_list
        n = len(layers)
        assert n % num_successors == 0, "checked by the config: the modules must split the layers evenly"
        assert head is not None, "checked by compress.theseus.check: the predecessor has an MLM head"
        self.cfg = predecessor.cfg
        self.predecessor = predecessor
        self.encoder_name = next(name for name, m in predecessor.named_children() if m is encoder)
        self.k = n // num_successors
        # The paper initialises the successor with the predecessor's first layers.
        self.successors = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(num_successors))
        for p in layers.parameters():
            p.requires_grad_(False)

    def forward(self, input_ids, cu_seqlens, mlm_positions, mlm_labels=None, max_seqlen=None, replace=None,
                position_ids=None, token_type_ids=None, **_) -> dict:
        """Packed batch in; `replace` (num_successors,) bool, None = successor only. Returns loss and logits."""
        enc = getattr(self.predecessor, self.encoder_name)
        x_TD, run = enc.begin(input_ids, cu_seqlens, max_seqlen, position_ids, token_type_ids)
        for i, successor in enumerate(self.successors):
            if replace is None or bool(replace[i]):
                x_TD = run(successor, x_TD)
            else:
                for layer in enc.layer_list[i * self.k:(i + 1) * self.k]:
                    x_TD = run(layer, x_TD)
        head = encoder_and_head(self.predecessor)[1]  # the predecessor's (ModernBERT: head and decoder in one)
        logits_MV = head(enc.end(x_TD)[mlm_positions])
        out = {"mlm_logits": logits_MV, "num_predictions": mlm_positions.numel()}
        if mlm_labels is not None:
            out["losses"] = {"mlm": mlm_loss(logits_MV, mlm_labels)}
            out["loss"] = out["losses"]["mlm"]
        return out

    def successor_state(self) -> dict[str, torch.Tensor]:
        """The successor as a plain pretraining model's state dict (predecessor layers left out)."""
        enc = getattr(self.predecessor, self.encoder_name)
        prefix = f"{self.encoder_name}.{next(n for n, m in enc.named_modules() if m is enc.layer_list)}."
        state = {k: v for k, v in self.predecessor.state_dict().items() if not k.startswith(prefix)}
        for i, layer in enumerate(self.successors):
            state.update({f"{prefix}{i}.{k}": v for k, v in layer.state_dict().items()})
        return state
