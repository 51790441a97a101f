"""BERT-of-Theseus (Xu et al. 2020): a predecessor whose layer modules are replaced, at random, by successors.

The predecessor's n layers form `num_successors` modules of k = n / num_successors consecutive layers;
successor i is one layer that stands in for module i. In a forward pass each module is replaced with
the probability the training step chooses (`replace`, one flag per module, drawn by the caller so the
draw follows the checkpointed RNG). The predecessor's layers are frozen; embeddings and the head are
shared and keep training, as in the paper. At export the successor alone is the student.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from kompakt.models.bert import mlm_loss, packed_inputs
from kompakt.models.packing import plan_attention


class TheseusModel(nn.Module):
    def __init__(self, predecessor: nn.Module, num_successors: int):
        super().__init__()
        encoder = predecessor.bert
        n = len(encoder.encoder.layer)
        assert n % num_successors == 0, "checked by the config: the modules must split the layers evenly"
        self.cfg = predecessor.cfg
        self.predecessor = predecessor
        self.k = n // num_successors
        # The paper initialises the successor with the predecessor's first layers.
        self.successors = nn.ModuleList(copy.deepcopy(encoder.encoder.layer[i]) for i in range(num_successors))
        for p in encoder.encoder.layer.parameters():
            p.requires_grad_(False)

    def forward(self, input_ids, cu_seqlens, mlm_positions, mlm_labels=None, max_seqlen=None, replace=None,
                position_ids=None, token_type_ids=None, **_) -> dict:
        """Packed batch in; `replace` (num_successors,) bool, None = successor only. Returns loss and logits."""
        enc = self.predecessor.bert
        position_ids, token_type_ids = packed_inputs(input_ids, cu_seqlens, position_ids, token_type_ids)
        x_TD = enc.embeddings(input_ids, position_ids, token_type_ids)
        plan = plan_attention(cu_seqlens, max_seqlen, x_TD.shape[0], self.cfg.attention, x_TD.dtype)
        for i, successor in enumerate(self.successors):
            if replace is None or bool(replace[i]):
                x_TD = successor(x_TD, plan)
            else:
                for layer in enc.encoder.layer[i * self.k:(i + 1) * self.k]:
                    x_TD = layer(x_TD, plan)
        logits_MV = self.predecessor.cls.predictions(x_TD[mlm_positions])
        out = {"mlm_logits": logits_MV, "num_predictions": mlm_positions.numel()}
        if mlm_labels is not None:
            out["losses"] = {"mlm": mlm_loss(logits_MV, mlm_labels)}
            out["loss"] = out["losses"]["mlm"]
        return out

    def successor_state(self) -> dict[str, torch.Tensor]:
        """The successor as a plain pretraining model's state dict (predecessor layers left out)."""
        state = {k: v for k, v in self.predecessor.state_dict().items() if ".encoder.layer." not in k}
        for i, layer in enumerate(self.successors):
            state.update({f"bert.encoder.layer.{i}.{k}": v for k, v in layer.state_dict().items()})
        return state
