"""DeepSpeed: the one place where a model is wrapped for distributed training.

`build_engine(model, cfg, dist_env)` initialises torch.distributed (gloo on CPU, NCCL on GPU),
builds the optimizer and the learning-rate schedule from the typed `PretrainConfig`, generates the
DeepSpeed config dict from it (there is no hand-written DeepSpeed JSON) and returns the engine.

Loss scaling and averaging. One micro-batch is one packed stream of about
`tokens_per_micro_batch` tokens; the model returns the mean loss over that micro-batch's predicted
positions. `engine.backward` divides it by the accumulation steps and the data-parallel reduction
averages over ranks, so an optimizer step follows the mean, over its `world x accumulation`
micro-batches, of their per-micro-batch means. Because micro-batches are packed to nearly the same
token count and the mask rate is fixed, they hold nearly the same number of predictions, so each
prediction weighs about the same; a micro-batch with fewer predictions weighs slightly more per
prediction. Tokens/s and `tokens_seen` count the exact real tokens.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from kompakt.dist import DistEnv
from kompakt.pretrain_config import OptimConfig, PretrainConfig, ScheduleConfig


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"), in plain torch.

    Per parameter: Adam moments with bias correction give `u = m_hat / (sqrt(v_hat) + eps) + wd * p`;
    the step is `lr * trust * u` with the layer-wise trust ratio `trust = ||p|| / ||u||`
    (1 where either norm is zero). Used on CPU, where DeepSpeed's FusedLamb (CUDA only) cannot run.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * trust, alpha=-group["lr"])
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, LayerNorm and other 1-d parameters are exempt."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused kernel on CUDA) or LAMB (DeepSpeed FusedLamb on CUDA, `Lamb` above on CPU)."""
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=device.type == "cuda")
    if device.type == "cuda":
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)


def lr_multiplier(cfg: ScheduleConfig, max_steps: int) -> Callable[[int], float]:
    """The schedule as a function of the optimizer step index (0-based) -> multiplier of `optim.lr`."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        if cfg.kind == "constant":
            return 1.0
        if cfg.kind == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        if cfg.kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        decay_start = max_steps - max(1, round(cfg.decay_fraction * max_steps))
        if step < decay_start:
            return 1.0
        return floor + (1.0 - floor) * (1.0 - (step - decay_start) / max(1, max_steps - decay_start))

    return f


def choose_device(dist_env: DistEnv) -> torch.device:
    """CUDA device `local_rank` when a GPU is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", dist_env.local_rank)
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on a GPU that supports it, fp32 otherwise; bf16 asked for on CPU stays fp32."""
    if device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deepspeed_config(cfg: PretrainConfig, *, accumulation_steps: int, world_size: int, precision: str) -> dict:
    """The DeepSpeed config, generated from the typed config.

    DeepSpeed counts batches in samples; one packed micro-batch is our "sample", so the micro batch
    size is 1 and the train batch is `accumulation_steps x world_size` micro-batches.
    """
    zero: dict = {"stage": cfg.zero_stage}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": accumulation_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: a non-finite gradient norm makes ZeRO skip the update (see loop).
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        # Our loop logs; DeepSpeed's own progress lines would interleave with it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@dataclass
class EngineInfo:
    """What the loop needs to know beyond the engine: device, precision and step geometry."""

    device: torch.device
    precision: str
    accumulation_steps: int
    world_size: int
    ds_config: dict


def init_distributed(dist_env: DistEnv) -> None:
    """Start torch.distributed through DeepSpeed: gloo on CPU (also for one process), NCCL on GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               rank=dist_env.rank, world_size=dist_env.world_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)


def build_engine(model: torch.nn.Module, cfg: PretrainConfig, dist_env: DistEnv, accumulation_steps: int | None = None):
    """Wrap `model` in a DeepSpeed engine with our optimizer and schedule; returns (engine, EngineInfo).

    `accumulation_steps` defaults to `cfg.accumulation_steps(world)` (micro-batches filled to the
    budget); the stage passes the data loader's figure, which uses the measured mean fill.
    torch.distributed must be initialised first (`init_distributed`).
    """
    import deepspeed

    device = choose_device(dist_env)
    precision = resolve_precision(cfg.precision, device)
    accum = accumulation_steps or cfg.accumulation_steps(dist_env.world_size)
    ds_cfg = deepspeed_config(cfg, accumulation_steps=accum, world_size=dist_env.world_size, precision=precision)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg.optim, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.schedule, cfg.max_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return engine, EngineInfo(device, precision, accum, dist_env.world_size, ds_cfg)


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a packed micro-batch's tensors to `device` (Python ints such as max_seqlen stay)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
