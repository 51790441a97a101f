"""DeepSpeed: the one place where a model is wrapped for distributed training.

`build_engine(model, section, dist_env)` builds the optimizer, the learning-rate schedule and the
DeepSpeed config from a training section's own subsections (`optim`, `schedule`, `engine`; see
kompakt/train_config.py; there is no hand-written DeepSpeed JSON) and returns a `TrainEngine`.
Every training stage uses it. DeepSpeed's private attributes are touched here, in
kompakt/checkpoint.py and in kompakt/ds_ops.py (start-up: op builds and their locks) only, behind
named functions such as `TrainEngine.skip_step`.

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
from kompakt.train_config import EngineConfig, OptimConfig, ScheduleConfig, TrainSection


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


def deepspeed_config(section: TrainSection, *, accumulation_steps: int, world_size: int, precision: str) -> dict:
    """The DeepSpeed config, generated from the typed training section (its `engine` subsection).

    DeepSpeed counts batches in samples; one packed micro-batch is our "sample", so the micro batch
    size is 1 and the train batch is `accumulation_steps x world_size` micro-batches.
    """
    eng: EngineConfig = section.engine
    zero: dict = {"stage": eng.zero_stage}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": accumulation_steps * world_size,
        "gradient_clipping": eng.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: a non-finite gradient norm makes ZeRO skip the update (see skip_step).
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
    from kompakt.ds_ops import prepare_deepspeed

    # No JIT build of the CPU shm comm op (gloo trains without it) and no hang on a dead build's lock.
    prepare_deepspeed()
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               rank=dist_env.rank, world_size=dist_env.world_size)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)


class TrainEngine:
    """A DeepSpeed engine with the few operations the shared loop needs, named for what they do.

    `module` is the trained `nn.Module`; calling the engine runs its forward. `info` holds the
    device, precision and step geometry.
    """

    def __init__(self, ds_engine, info: EngineInfo, zero_stage: int):
        self.ds = ds_engine
        self.info = info
        self.zero_stage = zero_stage

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def __call__(self, **batch):
        return self.ds(**batch)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def compile(self) -> None:
        self.ds.compile()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss (DeepSpeed divides it by the accumulation steps)."""
        self.ds.backward(loss)

    def micro_step(self) -> None:
        """After a micro-batch that is not the step's last: DeepSpeed only advances its counter."""
        self.ds.step()

    def step(self) -> None:
        """The optimizer step at the end of an accumulation boundary (clipped, scheduled)."""
        self.ds.step()

    def skip_step(self) -> None:
        """Skip this optimizer step because a loss was non-finite on some rank; the schedule still advances.

        Plain fp32 data parallel (ZeRO 0) has no overflow check: drop the gradients (torch optimizers
        leave a parameter without one untouched) and let DeepSpeed advance its counters with
        clipping off for this call, since there is nothing to clip. ZeRO and bf16 see the
        non-finite norm and skip the update themselves.
        """
        ds = self.ds
        skipped_before = ds.skipped_steps
        last_epoch = ds.lr_scheduler.last_epoch
        if self.zero_stage == 0 and self.info.precision == "fp32":
            ds.zero_grad()
            clip, ds._config.gradient_clipping = ds._config.gradient_clipping, 0.0
            try:
                ds.step()
            finally:
                ds._config.gradient_clipping = clip
        else:
            ds.step()
            assert ds.skipped_steps == skipped_before + 1, "DeepSpeed applied a non-finite step"
        if ds.lr_scheduler.last_epoch == last_epoch:
            ds.lr_scheduler.step()  # the schedule follows steps taken, skipped or not

    def measures_own_grad_norm(self) -> bool:
        """False for fp32 ZeRO 0, where DeepSpeed clips without keeping the norm (see `grad_norm_now`)."""
        return not (self.zero_stage == 0 and self.info.precision == "fp32")

    def grad_norm_now(self) -> float | None:
        """The global gradient 2-norm of the gradients present now (before `step`), for fp32 ZeRO 0."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    def last_grad_norm(self) -> float | None:
        """The norm DeepSpeed measured at the last step, or None (not measured, or non-finite)."""
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return None
        norm = float(norm)
        return norm if math.isfinite(norm) else None

    def lr(self) -> float:
        return self.ds.get_lr()[0]


def build_engine(model: torch.nn.Module, section: TrainSection, dist_env: DistEnv,
                 accumulation_steps: int | None = None) -> tuple[TrainEngine, EngineInfo]:
    """Wrap `model` in DeepSpeed with the section's optimizer and schedule; returns (engine, EngineInfo).

    Accumulation: `section.engine.accumulation_steps` when set, else `accumulation_steps` (the
    stage's figure; pretraining passes the loader's, from the measured mean fill), else the
    section's own `accumulation_steps(world)`. torch.distributed must be initialised first.
    """
    import deepspeed

    device = choose_device(dist_env)
    precision = resolve_precision(section.engine.precision, device)
    accum = section.engine.accumulation_steps or accumulation_steps
    if accum is None:
        accum = section.accumulation_steps(dist_env.world_size) if hasattr(section, "accumulation_steps") else 1
    ds_cfg = deepspeed_config(section, accumulation_steps=accum, world_size=dist_env.world_size, precision=precision)
    model = model.to(device)
    optimizer = make_optimizer(model, section.optim, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(section.schedule, section.max_steps))
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    info = EngineInfo(device, precision, accum, dist_env.world_size, ds_cfg)
    return TrainEngine(ds_engine, info, section.engine.zero_stage), info


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a packed micro-batch's tensors to `device` (Python ints such as max_seqlen stay)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
