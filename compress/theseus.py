"""BERT-of-Theseus (Xu et al. 2020): progressive module replacing on the masked-LM objective.

Phase 1, `max_steps - successor_steps` steps: every predecessor module (k consecutive teacher
layers) is replaced by its successor layer with probability p, constant or rising linearly
(p_t = min(1, replace_rate + rate_slope * t), the paper's curriculum); the predecessor is frozen.
Phase 2, the last `successor_steps` steps: the successor alone trains (the paper's fine-tuning phase).
The held-out loss is the successor's alone throughout, so it shows what the student has learnt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kompakt.errors import ConfigError
from kompakt.log import info
from kompakt.models.distill import encoder_and_head
from kompakt.models.theseus import TheseusModel, successor_config

from kompakt.compress.distill import build_loaders, heldout_mlm_loss, resume_and_train


def steps_taken(engine) -> int:
    """Optimizer steps taken so far (the schedule's counter, restored on resume)."""
    return int(engine.ds.lr_scheduler.last_epoch)


@dataclass
class TheseusStep:
    num_modules: int
    replace_rate: float
    rate_slope: float
    replacing_steps: int

    def rate(self, step: int) -> float:
        return min(1.0, self.replace_rate + self.rate_slope * step)

    def __call__(self, model, batch: dict, teacher) -> dict:
        module = model.module if hasattr(model, "module") else model
        if not module.training or steps_taken(model) >= self.replacing_steps:
            return model(**batch, replace=None)
        # The global torch RNG: checkpoints restore it, so a resumed run draws the same replacements.
        replace = torch.rand(self.num_modules) < self.rate(steps_taken(model))
        return model(**batch, replace=replace)


def check(spec, teacher) -> None:
    """Refuse, before anything runs, a teacher or successor BERT-of-Theseus cannot have."""
    key = f"students.{spec.name}"
    head = encoder_and_head(teacher)[1]
    if teacher.cfg.family not in ("bert", "spanbert", "modernbert") or head is None:
        raise ConfigError(f"{key}: BERT-of-Theseus replaces the modules of a BERT or ModernBERT with an MLM head; this "
                          f"teacher is {teacher.cfg.family}{' without a head' if head is None else ''} "
                          f"(for ALBERT's one shared layer use distill or layer_drop)")
    n = teacher.cfg.num_layers
    if spec.num_layers >= n or n % spec.num_layers:
        raise ConfigError(f"{key}.num_layers={spec.num_layers} must divide the teacher's {n} layers into modules of "
                          f"at least 2 (e.g. {n // 2})")


def train_theseus(spec, teacher: torch.nn.Module, tokenizer_stage: Path, work_dir: Path, *, stop,
                  extra_state: dict) -> dict:
    """Train the successor; returns the successor as a plain pretraining model and its figures."""
    import copy

    from kompakt import checkpoint, dist
    from kompakt.engine import choose_device
    from kompakt.models import build_pretraining_model

    check(spec, teacher)
    env = dist.setup_env()
    loader, eval_batches = build_loaders(spec, teacher.cfg.vocab_size, tokenizer_stage, env)
    checkpoint.seed_everything(spec.seed)
    # The teacher may be frozen by an earlier student; the copy trains its embeddings and head again.
    model = TheseusModel(copy.deepcopy(teacher).train().requires_grad_(True), spec.num_layers)
    device = choose_device(env)
    student_cfg = successor_config(teacher.cfg, spec.num_layers)

    def successor() -> torch.nn.Module:
        s = build_pretraining_model(student_cfg)
        s.load_state_dict(model.successor_state(), strict=False)
        return s

    before = heldout_mlm_loss(successor().to(device), eval_batches, device)
    teacher_loss = heldout_mlm_loss(teacher.to(device), eval_batches, device)
    replacing = spec.max_steps - spec.successor_steps
    step_fn = TheseusStep(spec.num_layers, spec.replace_rate, spec.rate_slope, replacing)
    info(f"compress: {spec.name}: BERT-of-Theseus, {teacher.cfg.num_layers} -> {spec.num_layers} layers, "
         f"replacement rate {spec.replace_rate} (+{spec.rate_slope}/step) for {replacing} steps, then "
         f"{spec.successor_steps} successor-only steps")
    result, before = resume_and_train(model, spec, env, loader, eval_batches, work_dir, step_fn=step_fn, teacher=None,
                                      stop=stop, before=before,
                                      extra_state={**extra_state, "model": student_cfg.model_dump(mode="json")})
    student = successor().eval()
    after = heldout_mlm_loss(student.to(device), eval_batches, device)
    return {"model": student.cpu(), "result": result, "num_params": sum(p.numel() for p in student.parameters()),
            "mlm_before": before, "mlm_after": after, "mlm_teacher": teacher_loss}
