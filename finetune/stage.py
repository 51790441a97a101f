"""The finetune stage: every model of a run on every task of a suite, several seeds each, as independent jobs.

Reads top to bottom: the suite and its data (every task loaded and checked before anything trains),
the models (each checked: a folder with weights and a tokenizer), the jobs (task x model x train size
x seed, in a fixed order; `shard: i/n` takes every n-th), each job in its own directory with kill-safe
checkpoints and a `result.json` (predictions on dev and test, steps, time) written last, and the
manifest once every job has its result.

The stage directory `<run_dir>/finetune-<hash>/` is used in place: a killed or requeued job resumes
from its checkpoint, finished jobs are skipped, and Slurm array tasks share the directory.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kompakt import dist
from kompakt.errors import DataError
from kompakt.finetune_config import FinetuneConfig
from kompakt.log import info
from kompakt.loop import StopFlag, exit_for_requeue, test_hook
from kompakt.runs import package_versions, write_json_atomic

from kompakt.finetune.lattice import check_task
from kompakt.finetune.tasks import training_rows

RESULT = "result.json"


@dataclass(frozen=True)
class Job:
    task: str
    model: str
    size: str     # "all" or a train size of the learning curve
    seed: int

    @property
    def path(self) -> str:
        return f"{self.task}/{self.model}/{self.size}/seed{self.seed}"


def grid_points(task) -> list[dict]:
    """The combinations of the task's small hyper-parameter grid (empty without a grid)."""
    import itertools

    g = task.train.grid
    if g is None:
        return []
    keys = [k for k in ("lr", "batch_size", "epochs") if getattr(g, k)]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(getattr(g, k) for k in keys))]


def plan_jobs(cfg: FinetuneConfig, task_names: list[str], models: list[str], train_sizes: dict[str, int],
              grids: dict[str, int] | None = None) -> list[Job]:
    """Every job, in order: per task and model first its grid points (seed 0, size "grid<k>"), then
    size and seed (curve sizes only where they are below the train set); then the task-distillation
    jobs, which read the teacher's fine-tuned model (seed 0)."""
    out = []
    for t in task_names:
        for m in models:
            out += [Job(t, m, f"grid{k}", 0) for k in range((grids or {}).get(t, 0))]
            sizes = ["all"]
            if m in cfg.curve_models:
                sizes += [str(s) for s in cfg.learning_curve if s < train_sizes[t]]
            for size in sizes:
                out += [Job(t, m, size, seed) for seed in range(cfg.seeds)]
    for d in cfg.distill:
        out += [Job(t, d.name, "all", seed) for t in task_names for seed in range(cfg.seeds)]
    return out


def check_distill(cfg: FinetuneConfig, models: dict[str, Path]) -> None:
    from kompakt.errors import ConfigError

    for d in cfg.distill:
        for role, name in (("student", d.student), ("teacher", d.teacher)):
            if name not in models:
                raise ConfigError(f"finetune.distill.{d.name}.{role}={name!r} is not one of finetune.models "
                                  f"({', '.join(models)})")
        if d.name in models:
            raise ConfigError(f"finetune.distill: the name {d.name!r} is already a model of finetune.models")
    if cfg.distill and not cfg.keep_models:
        raise ConfigError("finetune.distill needs the teacher's fine-tuned models; set finetune.keep_models: true")


def augmented(stage_dir: Path, d, task, examples: list[dict], mlm_dir: Path) -> tuple[list[dict], dict]:
    """The augmented training set of one task for one distillation entry, built once and kept as JSONL
    (named by the MLM's weights and the settings), so every seed and a rerun reuse it."""
    import hashlib

    from kompakt.runs import content_digest

    from kompakt.finetune.augment import Augmenter

    if d.augment == 0:
        return [], {}
    from kompakt.hf_lattice import is_lattice_folder  # imports transformers: only when augmenting

    if is_lattice_folder(mlm_dir):
        # The MLM would propose characters without the lattice's words around them, and word ids it predicts
        # are no tokenizer tokens: augmentation would be wrong, so the job trains on the task's own examples.
        info(f"finetune: {d.name} on {task.name}: augmentation skipped, it does not support Lattice-BERT "
             f"({mlm_dir}) yet; distilling on the {len(examples):,} training examples alone")
        return [], {"skipped": "lattice-bert"}
    key = hashlib.sha256(json.dumps([content_digest(mlm_dir / "model.safetensors"), task.name, d.augment, d.augment_p,
                                     len(examples)]).encode()).hexdigest()[:16]
    path = stage_dir / "augment" / f"{task.name}-{key}.jsonl"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines()], json.loads(meta.read_text())
    aug = Augmenter(mlm_dir, p=d.augment_p, max_len=task.train.max_seq_len)
    rows = aug.augment(examples, task.type, d.augment, seed=0)
    figures = aug.report()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    write_json_atomic(meta, figures)
    return rows, figures


def grid_result(stage_dir: Path, job: Job, k: int) -> Path:
    """Where grid point k of the job's task and model writes its result (seed 0, the full training set)."""
    return stage_dir / "jobs" / job.task / job.model / f"grid{k}" / "seed0" / RESULT


def grid_done(stage_dir: Path, job: Job, points: list[dict]) -> bool:
    return all(grid_result(stage_dir, job, k).is_file() for k in range(len(points)))


def best_grid_point(stage_dir: Path, job: Job, points: list[dict]) -> dict:
    """The grid point with the lowest dev loss for this task and model (its grid jobs ran first)."""
    from kompakt.errors import ConfigError

    losses = []
    for k in range(len(points)):
        path = grid_result(stage_dir, job, k)
        if not path.is_file():
            raise ConfigError(f"finetune: {job.path} needs the grid results of {job.task}/{job.model} ({path}); run "
                              f"the grid jobs (they come first in the job order) before this shard")
        losses.append(json.loads(path.read_text())["dev_loss"])
    return points[min(range(len(points)), key=losses.__getitem__)]


def check_model(name: str, folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise DataError(f"finetune.models: {name} -> {folder} has no config.json; point at a Hugging Face model folder")
    if not any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise DataError(f"finetune.models: {name} -> {folder} has no model weights (model.safetensors); an ONNX "
                        f"int8 student cannot be fine-tuned, leave it out")


def _requeue(why: str) -> None:
    exit_for_requeue("finetune", why)


def run(cfg: FinetuneConfig, models: dict[str, Path], stage_dir: Path, *, stage_hash: str, inputs: dict,
        recipe_name: str) -> Path:
    """Run this process's share of the jobs; write the manifest when every job of the stage has its result."""
    with StopFlag() as stop:
        return _run(cfg, models, Path(stage_dir), stage_hash=stage_hash, inputs=inputs, recipe_name=recipe_name,
                    stop=stop)


def _run(cfg: FinetuneConfig, models: dict[str, Path], stage_dir: Path, *, stage_hash: str, inputs: dict,
         recipe_name: str, stop) -> Path:
    from kompakt.engine import init_distributed

    from kompakt.finetune.tasks import load_suite, load_task
    from kompakt.finetune.train import run_job

    t0 = time.perf_counter()
    test_hook("startup")
    suite = load_suite(cfg.suite)
    overrides = {k: v for k, v in cfg.train.model_dump().items() if v is not None}
    tasks = [t.model_copy(update={"train": t.train.model_copy(update=overrides)})
             for t in suite.tasks if not cfg.tasks or t.name in cfg.tasks]
    unknown = sorted(set(cfg.tasks) - {t.name for t in suite.tasks})
    if unknown:
        from kompakt.errors import ConfigError

        raise ConfigError(f"finetune.tasks: {unknown} are not tasks of the suite {suite.name}; it has "
                          f"{', '.join(t.name for t in suite.tasks)}")
    data = {t.name: load_task(t, suite.folder) for t in tasks}
    for name, folder in models.items():
        check_model(name, folder)
        for t in tasks:
            check_task(t, folder)  # a task a Lattice-BERT cannot fine-tune yet fails here, before any job trains
    check_distill(cfg, models)
    distills = {d.name: d for d in cfg.distill}
    train_sizes = {t: len(d.splits["train"]) for t, d in data.items()}
    points = {t.name: grid_points(t) for t in tasks}
    jobs = plan_jobs(cfg, [t.name for t in tasks], list(models), train_sizes, {t: len(p) for t, p in points.items()})
    mine = jobs
    if cfg.shard:
        i, n = (int(x) for x in cfg.shard.split("/"))
        mine = jobs[i::n]
    init_distributed(dist.setup_env())
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stage_dir / "config.json", cfg.model_dump(mode="json"))
    by_name = {t.name: t for t in tasks}
    info(f"finetune: {len(jobs)} jobs ({len(tasks)} tasks x {len(models)} models x sizes x {cfg.seeds} seeds)"
         + (f", this shard runs {len(mine)}" if cfg.shard else ""))
    for k, job in enumerate(mine, 1):
        job_dir = stage_dir / "jobs" / job.path
        if (job_dir / RESULT).is_file():
            continue
        task, d = by_name[job.task], data[job.task]
        grid_choice = None
        if job.size.startswith("grid"):  # one grid point: the full training set, the point's settings
            task = task.model_copy(update={"train": task.train.model_copy(update=points[job.task][int(job.size[4:])])})
            train = training_rows(d.splits["train"], "all", 0, cfg.max_train_examples)
        else:
            if points[job.task] and job.model not in distills:
                if cfg.shard and not grid_done(stage_dir, job, points[job.task]):
                    info(f"finetune: {job.path} waits for its grid jobs (another shard); left for the final run")
                    continue
                grid_choice = best_grid_point(stage_dir, job, points[job.task])
                task = task.model_copy(update={"train": task.train.model_copy(update=grid_choice)})
            train = training_rows(d.splits["train"], job.size if job.size == "all" else int(job.size), job.seed,
                                  cfg.max_train_examples)
        splits = {"train": train, "dev": d.splits["dev"], "test": d.splits["test"]}
        keep = (stage_dir / "models" / job.task / job.model) if cfg.keep_models and job.seed == 0 and job.size == "all" else None
        info(f"finetune: job {k}/{len(mine)}: {job.path} ({len(train):,} training examples)")
        job_dir.mkdir(parents=True, exist_ok=True)
        kd = None
        model_dir = models.get(job.model)
        if job.model in distills:
            spec = distills[job.model]
            teacher_ft = stage_dir / "models" / job.task / spec.teacher
            if not (teacher_ft / "config.json").is_file():
                if cfg.shard:
                    info(f"finetune: {job.path} waits for the fine-tuned teacher (another shard); left for the final run")
                    continue
                from kompakt.errors import ConfigError

                raise ConfigError(f"finetune: {job.path} distils from the teacher fine-tuned on {job.task}, which is not "
                                  f"there yet ({teacher_ft}); run the teacher's jobs (shard) first")
            extra, aug_figures = augmented(stage_dir, spec, task, train, models[spec.teacher])
            kd = {"teacher_dir": teacher_ft, "alpha": spec.alpha, "temperature": spec.temperature, "extra": extra,
                  "cache_dir": stage_dir / "cache"}
            model_dir = models[spec.student]
        out = run_job(model_dir, task, splits, d.labels, seed=job.seed, work_dir=job_dir,
                      engine_cfg=cfg.engine, run_cfg=cfg.run, stop=stop, keep_dir=keep, distill=kd,
                      corpus=d.corpus)
        if kd is not None:
            out.setdefault("distill", {}).update(augment=aug_figures, teacher=spec.teacher, student=spec.student)
        if out["stopped"] != "done":
            _requeue(f"{job.path} stopped by {out['stopped']} at step {out['step']}")
        out.update(job=job.__dict__, model_dir=str(model_dir), **({"grid_choice": grid_choice} if grid_choice else {}))
        write_json_atomic(job_dir / RESULT, out)
        shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)  # the result is what later stages read
        if stop.requested:
            _requeue(f"stopped by a signal after {job.path}")

    missing = [j.path for j in jobs if not (stage_dir / "jobs" / j.path / RESULT).is_file()]
    if missing:
        info(f"finetune: this shard is done; {len(missing)} jobs of other shards are still missing")
        return stage_dir
    write_json_atomic(stage_dir / "manifest.json", {
        "stage": "finetune", "hash": stage_hash, "inputs": inputs, "config": cfg.model_dump(mode="json"),
        "suite": suite.name, "tasks": [t.model_dump(mode="json") for t in tasks],
        "labels": {t: d.labels for t, d in data.items()},
        "models": {**{n: str(p) for n, p in models.items()},
                   **{d.name: str(models[d.student]) for d in cfg.distill}},
        "distilled": {d.name: d.model_dump(mode="json") for d in cfg.distill}, "jobs": [j.path for j in jobs],
        "versions": package_versions(), "host": platform.node(), "argv": sys.argv, "recipe": recipe_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "timings": {"total_s": round(time.perf_counter() - t0, 2)},
        "complete": True})
    info(f"finetune: {len(jobs)} jobs complete -> {stage_dir}")
    return stage_dir


def read_results(stage_dir: Path) -> dict[str, dict]:
    """job path -> result.json of a complete finetune stage (for eval)."""
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    return {p: json.loads((stage_dir / "jobs" / p / RESULT).read_text()) for p in manifest["jobs"]}
