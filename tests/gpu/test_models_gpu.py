"""GPU attention paths (FlexAttention, flash varlen) against the CPU reference; skipped without CUDA."""

import pytest
import torch

from kompakt.model_config import ModelConfig
from kompakt.models import build_pretraining_model
from kompakt.models.packing import attend, plan_attention

pytestmark = pytest.mark.gpu


def cu(lengths, device):
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    out[1:] = torch.cumsum(torch.tensor(lengths, device=device), 0)
    return out


@pytest.mark.parametrize("backend,dtype,tol", [("flex", torch.float32, 1e-4), ("varlen", torch.bfloat16, 2e-2),
                                               ("auto", torch.bfloat16, 2e-2)])
def test_gpu_backends_match_reference(backend, dtype, tol):
    torch.manual_seed(0)
    lengths = [130, 7, 300, 64]
    T = sum(lengths)
    q, k, v = (torch.randn(T, 4, 64, device="cuda", dtype=dtype) for _ in range(3))
    ref = attend(q.float().cpu(), k.float().cpu(), v.float().cpu(), plan_attention(cu(lengths, "cpu"), None, T, "mask"))
    plan = plan_attention(cu(lengths, "cuda"), max(lengths), T, backend, dtype)
    assert plan.backend in ("flex", "varlen")
    torch.testing.assert_close(attend(q, k, v, plan).float().cpu(), ref, atol=tol, rtol=tol)


def test_model_trains_on_gpu_in_bf16():
    model = build_pretraining_model(ModelConfig(family="bert", vocab_size=128, hidden_size=64, num_layers=2,
                                                num_heads=4, intermediate_size=128)).cuda()
    ids = torch.randint(5, 128, (50,), device="cuda")
    positions = torch.tensor([3, 20, 40], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, cu_seqlens=cu([20, 30], "cuda"), max_seqlen=30, mlm_positions=positions,
                    mlm_labels=ids[positions])
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
