"""Cluster profiles, templates and the plan of a run's jobs: what `kompakt slurm submit` renders.

A plan is a list of `Job`s, each one sbatch script with the jobs it waits for (`afterok`). Which
stages get a job follows from the recipe (`kompakt.pipeline.STAGES`) and from what is already
complete on disk, never from a per-stage script: a stage that is complete gets no job, a stage
with an incomplete upstream brings that upstream along. Kinds of job:

- `train`: pretrain and compress, on `--nodes` nodes with `--gpus-per-node` GPUs (or
  `--procs-per-node` CPU processes); `srun` starts one kompakt per process (rank from
  SLURM_PROCID), or one `torchrun` per node with the c10d rendezvous on the first host;
- `array`: data_prep parts (`data.shard_index=$SLURM_ARRAY_TASK_ID`, with `data.num_shards > 1`)
  and fine-tuning shards (`finetune.shard=i/n`, with `--finetune-tasks n`), each followed by one
  `task` job that merges the parts or finishes what the shards left;
- `task`: one process (tokenizer, the merge, eval).

Jobs that save and exit 75 when told to stop (pretrain, compress, finetune) get Slurm's warning
signal `--signal=B:USR1@<seconds>` and requeue themselves (slurm/templates/prelude.sh).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kompakt.errors import ConfigError

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
CLUSTERS = HERE / "clusters"
RANK_SH = TEMPLATES / "rank.sh"

# Profile keys that shape the job; every other KEY=value of a profile is exported into the job.
PROFILE_KEYS = {
    "PARTITION": "partition for GPU (and training) jobs",
    "CPU_PARTITION": "partition for jobs without GPUs (default: PARTITION)",
    "ACCOUNT": "project account (usually given with --account)",
    "QOS": "quality of service",
    "TIME": "default time limit, e.g. 1-00:00:00 (--time overrides)",
    "MEM": "memory per node, e.g. 480G (0 = all)",
    "CONSTRAINT": "node features",
    "CPUS_PER_TASK": "CPUs of a one-process job (data_prep, tokenizer, eval, fine-tuning tasks)",
    "CPUS_PER_RANK": "CPUs per training process",
    "GPU_REQUEST": "gpus-per-node (default) or gres (--gres=gpu:G)",
    "LAUNCHER": "srun (one task per process, default) or torchrun (one per node, c10d rendezvous)",
    "SRUN_ARGS": "extra srun arguments for the job steps, e.g. --cpu-bind=cores",
    "SBATCH_ARGS": "extra sbatch directives, space-separated, e.g. --exclusive",
    "MODULES": "modules to load, space-separated",
    "SETUP": "one shell line run before the job (activate an environment, bind mounts)",
    "CONTAINER": "container image; kompakt then runs as $CONTAINER_EXEC $CONTAINER kompakt",
    "CONTAINER_EXEC": "how to run in the container (default: apptainer exec)",
    "WARN_SECONDS": "seconds before the time limit at which training is told to save (default 300)",
    "MAX_REQUEUES": "requeues after which a job stops requeueing itself (default 20)",
    "STEP_EXIT_WAIT": "seconds the other ranks get to finish after the first exits (srun --wait, default 600)",
}
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
_KEY = re.compile(r"^[A-Z][A-Z0-9_]*$")
SAVING_STAGES = ("pretrain", "compress", "finetune")  # exit 75 after a save, so they get the warning signal


def available_profiles() -> list[str]:
    return sorted(p.stem for p in CLUSTERS.glob("*.env"))


def load_profile(name_or_path: str) -> tuple[str, dict[str, str], dict[str, str]]:
    """(label, KEY -> value) of `slurm/clusters/<name>.env` or of a file path. Lines are `KEY=value`
    with optional quotes; `#` starts a comment. Nothing is expanded here: the keys of PROFILE_KEYS
    shape the job, every other key becomes `export KEY=value` in it as written (the third item), and the
    job's shell expands it there, so `$USER` or `$SLURM_JOB_ID` mean the job's."""
    path = Path(name_or_path)
    if not (path.suffix == ".env" and path.is_file()):
        path = CLUSTERS / f"{name_or_path}.env"
    if not path.is_file():
        raise ConfigError(f"no cluster profile {name_or_path!r}; use one of {', '.join(available_profiles())} or the "
                          f"path of a .env file (see slurm/clusters/)")
    values: dict[str, str] = {}
    raw: dict[str, str] = {}  # as written, quotes included: what an `export` line in the job gets
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not _KEY.match(key):
            raise ConfigError(f"{path}:{n}: expected KEY=value with an upper-case KEY, got {line!r}")
        value = value.strip()
        raw[key] = value
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    launcher = values.get("LAUNCHER", "srun")
    if launcher not in ("srun", "torchrun"):
        raise ConfigError(f"{path}: LAUNCHER={launcher!r}; use srun or torchrun")
    if values.get("GPU_REQUEST", "gpus-per-node") not in ("gpus-per-node", "gres"):
        raise ConfigError(f"{path}: GPU_REQUEST={values['GPU_REQUEST']!r}; use gpus-per-node or gres")
    for key in ("WARN_SECONDS", "MAX_REQUEUES", "STEP_EXIT_WAIT", "CPUS_PER_TASK", "CPUS_PER_RANK"):
        if key in values and not values[key].isdigit():
            raise ConfigError(f"{path}: {key}={values[key]!r} must be a whole number")
    return str(path), values, raw


@dataclass
class Options:
    """What `kompakt slurm submit` was asked for, beyond the recipe."""

    stage: str = "all"
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None    # default: gpus_per_node, or 1 without GPUs
    profile: str = "local"
    launcher: str | None = None          # default: the profile's
    time: str | None = None
    account: str | None = None
    partition: str | None = None
    finetune_tasks: int = 1
    warn_seconds: int | None = None
    max_requeues: int | None = None
    sbatch_args: list[str] = field(default_factory=list)


@dataclass
class Job:
    key: str                 # unique in the plan: "prepare-parts", "pretrain", ...
    stage: str
    kind: str                # train | array | task
    script: str
    after: list[str]         # keys of jobs in the plan, or "id:<job id>" of jobs already queued
    array: int | None = None
    stage_dir: str = ""
    dependency: str = "afterok"  # afterany for a job that finishes whatever its predecessors left


    def final_script(self, ids: dict[str, str] | None = None) -> str:
        """The script with its `--dependency` directive: job ids once known, `<key>` in a dry run."""
        if not self.after:
            return self.script
        ids = ids or {}
        refs = [a[3:] if a.startswith("id:") else ids.get(a, f"<{a}>") for a in self.after]
        dep = f"#SBATCH --dependency={self.dependency}:{':'.join(refs)}\n#SBATCH --kill-on-invalid-dep=yes\n"
        head, sep, rest = self.script.partition("#SBATCH --requeue\n")
        assert sep, "every template's directives include --requeue"
        return head + sep + dep + rest


def render(template: str, values: dict[str, str]) -> str:
    """slurm/templates/<template> with every {{NAME}} replaced; a placeholder without a value is a bug."""
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise KeyError(f"{template}: no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def entry_point(profile: dict[str, str], name: str, module: str) -> list[str]:
    """How a job starts the console script `name` (kompakt, torchrun): in the container, or the one of
    this very installation (`python -m module` where the script is missing)."""
    if profile.get("CONTAINER"):
        return [*shlex.split(profile.get("CONTAINER_EXEC", "apptainer exec")), profile["CONTAINER"], name]
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def _q(words: list[str]) -> str:
    return " ".join(shlex.quote(w) for w in words)


class Renderer:
    """The profile, options and log folder shared by every job plan; renders directives and steps."""

    def __init__(self, opts: Options, name: str, log_dir: Path):
        self.opts = opts
        self.name = name
        self.log_dir = log_dir
        self.profile_label, self.profile, self.profile_raw = load_profile(opts.profile)
        self.launcher = opts.launcher or self.profile.get("LAUNCHER", "srun")
        if self.launcher not in ("srun", "torchrun"):
            raise ConfigError(f"--launcher {self.launcher!r}; use srun or torchrun")
        for flag, value, low in (("--nodes", opts.nodes, 1), ("--gpus-per-node", opts.gpus_per_node, 0),
                                 ("--finetune-tasks", opts.finetune_tasks, 1),
                                 ("--procs-per-node", opts.procs_per_node or 1, 1)):
            if value < low:
                raise ConfigError(f"{flag} must be at least {low}, got {value}")
        self.procs = opts.procs_per_node or max(opts.gpus_per_node, 1)
        if opts.gpus_per_node and self.procs != opts.gpus_per_node:
            raise ConfigError(f"--procs-per-node {self.procs} with --gpus-per-node {opts.gpus_per_node}: training "
                              f"runs one process per GPU, so leave --procs-per-node out")
        self.cwd = Path.cwd()

    # --- rendering -------------------------------------------------------------------------------

    def environment(self) -> str:
        lines = []
        if self.profile.get("MODULES"):
            lines.append(f"module load {self.profile['MODULES']}")
        if self.profile.get("SETUP"):
            lines.append(self.profile["SETUP"])
        for key, value in self.profile_raw.items():
            if key not in PROFILE_KEYS:
                lines.append(f"export {key}={value}")
        lines.append("export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}")
        return "\n".join(lines)

    def directives(self, key: str, *, gpus: bool, array: int | None = None, saving: bool,
                   nodes: int = 1, tasks_per_node: int = 1, cpus: str | None = None, gpus_per_node: int = 0) -> str:
        p, o = self.profile, self.opts
        name = f"kompakt-{self.name}-{key}"
        out = "%x-%A_%a.out" if array else "%x-%j.out"
        d = [f"--job-name={name}", f"--chdir={self.cwd}", f"--output={self.log_dir / out}", "--open-mode=append",
             f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", "--requeue"]
        if cpus:
            d.append(f"--cpus-per-task={cpus}")
        partition = o.partition or (p.get("PARTITION") if gpus else p.get("CPU_PARTITION") or p.get("PARTITION"))
        for flag, value in (("partition", partition), ("account", o.account or os.environ.get("KOMPAKT_SLURM_ACCOUNT")
                                                       or p.get("ACCOUNT")),
                            ("qos", p.get("QOS")), ("time", o.time or p.get("TIME")), ("mem", p.get("MEM")),
                            ("constraint", p.get("CONSTRAINT"))):
            if value:
                d.append(f"--{flag}={value}")
        if gpus_per_node:
            d.append(f"--gres=gpu:{gpus_per_node}" if p.get("GPU_REQUEST") == "gres" else f"--gpus-per-node={gpus_per_node}")
        if array:
            d.append(f"--array=0-{array - 1}")
        if saving:
            warn = o.warn_seconds if o.warn_seconds is not None else int(p.get("WARN_SECONDS", 300))
            d.append(f"--signal=B:USR1@{warn}")
        d += shlex.split(p.get("SBATCH_ARGS", "")) + list(o.sbatch_args)
        return "\n".join(f"#SBATCH {x}" for x in d)

    def _values(self, stage: str, directives: str, step: str, **more: str) -> dict[str, str]:
        max_requeues = self.opts.max_requeues if self.opts.max_requeues is not None else int(self.profile.get("MAX_REQUEUES", 20))
        prelude = render("prelude.sh", {"ENVIRONMENT": self.environment(), "LOG_DIR": str(self.log_dir),
                                        "MAX_REQUEUES": str(max_requeues)})
        return {"STAGE": stage, "PROFILE": self.profile_label, "DIRECTIVES": directives, "PRELUDE": prelude.rstrip(),
                "STEP": step, **more}

    def srun(self, *args: str) -> str:
        return _q(["srun", *args, *shlex.split(self.profile.get("SRUN_ARGS", ""))])

class Planner(Renderer):
    """Renders the jobs of one recipe: `plan(stage)` returns them in submission order."""

    def __init__(self, recipe_path: str | Path, overrides: list[str], opts: Options):
        from kompakt.config import load_recipe
        from kompakt.pipeline import Pipeline

        self.recipe_path = Path(recipe_path).resolve()
        self.overrides = list(overrides)
        self.recipe = load_recipe(recipe_path, overrides)
        self.pipeline = Pipeline(self.recipe)
        super().__init__(opts, self.recipe.name, self.pipeline.run_dir.resolve() / "slurm")
        self.queued: dict[str, str] = {}  # stage dir -> id of a job already pending or running for it

    # --- which stages ---------------------------------------------------------------------------

    def stages(self) -> list[str]:
        """The stages to submit, in pipeline order: the asked one (or all) plus incomplete upstream."""
        from kompakt.pipeline import STAGES
        from kompakt.runs import is_complete

        enabled = [n for n, s in STAGES.items() if s.enabled(self.recipe)]
        if self.opts.stage != "all" and self.opts.stage not in STAGES:
            raise ConfigError(f"--stage {self.opts.stage!r}; use all or one of {', '.join(STAGES)}")
        if self.opts.stage != "all" and self.opts.stage not in enabled:
            self.pipeline.stage(self.opts.stage)  # the one clear line about the missing section
        wanted: set[str] = set()

        def want(name: str) -> None:
            if name in wanted:
                return
            if is_complete(self.stage_dir(name)):
                return
            wanted.add(name)
            for up in STAGES[name].upstream_for(self.recipe)[0]:
                want(up)

        for name in (enabled if self.opts.stage == "all" else [self.opts.stage]):
            want(name)
        return [n for n in STAGES if n in wanted]

    def stage_dir(self, name: str) -> Path:
        return self.pipeline.resolve(name)[0]

    def command(self, stage: str, extra: list[str] = ()) -> str:
        return _q([*entry_point(self.profile, "kompakt", "kompakt.cli"), stage, str(self.recipe_path), *self.overrides]) + \
            "".join(" " + e for e in extra)

    def train_job(self, stage: str) -> Job:
        o, p = self.opts, self.profile
        nodes, procs, gpn = o.nodes, self.procs, o.gpus_per_node
        cpus_rank = p.get("CPUS_PER_RANK")
        wait = p.get("STEP_EXIT_WAIT", "600")
        if self.launcher == "srun":
            directives = self.directives(stage, gpus=gpn > 0, saving=True, nodes=nodes, tasks_per_node=procs,
                                         cpus=cpus_rank, gpus_per_node=gpn)
            step = f"{self.srun(f'--wait={wait}')} bash {shlex.quote(str(RANK_SH))} {self.command(stage)}"
        else:
            cpus = str(int(cpus_rank) * procs) if cpus_rank else None
            directives = self.directives(stage, gpus=gpn > 0, saving=True, nodes=nodes, tasks_per_node=1,
                                         cpus=cpus, gpus_per_node=gpn)
            # torchrun ignores TERM and USR1 (inherited SIG_IGN; it is told to handle only SIGINT), so
            # Slurm's signals reach the workers, which save; torchrun would kill them 30 s after forwarding.
            torchrun = _q(entry_point(p, "torchrun", "torch.distributed.run")) + (
                " --nnodes=\"$SLURM_NNODES\""
                f" --nproc-per-node={procs} --rdzv-backend=c10d --rdzv-endpoint=\"$MASTER_ADDR:$MASTER_PORT\""
                " --rdzv-id=\"$SLURM_JOB_ID\" --max-restarts=0 --signals-to-handle=SIGINT --no-python")
            step = (f"{self.srun(f'--wait={wait}', '--ntasks-per-node=1')} "
                    f"bash -c 'trap \"\" TERM USR1; exec \"$@\"' torchrun {torchrun} "
                    f"bash {shlex.quote(str(RANK_SH))} {self.command(stage)}")
        script = render("train.sbatch", self._values(stage, directives, step, NODES=str(nodes),
                                                     PROCS_PER_NODE=str(procs), LAUNCHER=self.launcher))
        return Job(stage, stage, "train", script, [])

    def task_cpus(self, stage: str) -> str | None:
        """A one-process job's CPUs: the profile's, or the worker processes the recipe asks for if more."""
        cpus = int(self.profile.get("CPUS_PER_TASK", 0) or 0)
        section = {"prepare": self.recipe.data, "tokenizer": self.recipe.tokenizer}.get(stage)
        cpus = max(cpus, getattr(section, "num_proc", 0) or 0)
        return str(cpus) if cpus else None

    def task_job(self, key: str, stage: str, *, gpus: int = 0, saving: bool = False, extra: list[str] = ()) -> Job:
        directives = self.directives(key, gpus=gpus > 0, saving=saving, cpus=self.task_cpus(stage),
                                     gpus_per_node=gpus)
        step = f"{self.srun('--ntasks=1')} bash {shlex.quote(str(RANK_SH))} {self.command(stage, list(extra))}"
        return Job(key, stage, "task", render("task.sbatch", self._values(stage, directives, step)), [])

    def array_job(self, key: str, stage: str, n: int, shard_arg: str, shard_key: str, *, gpus: int = 0,
                  saving: bool = False) -> Job:
        directives = self.directives(key, gpus=gpus > 0, saving=saving, array=n, cpus=self.task_cpus(stage),
                                     gpus_per_node=gpus)
        step = f"{self.srun('--ntasks=1')} bash {shlex.quote(str(RANK_SH))} {self.command(stage, [shard_arg])}"
        script = render("array.sbatch", self._values(stage, directives, step, ARRAY_SIZE=str(n), SHARD_KEY=shard_key))
        return Job(key, stage, "array", script, [], array=n)

    def jobs_for(self, stage: str) -> list[Job]:
        gpu1 = 1 if self.opts.gpus_per_node else 0
        if stage == "prepare":
            n = self.recipe.data.num_shards
            if n > 1:
                parts = self.array_job("prepare-parts", "prepare", n, '"data.shard_index=$part"', "data.shard_index")
                merge = self.task_job("prepare", "prepare")
                merge.after = [parts.key]
                return [parts, merge]
            return [self.task_job("prepare", "prepare")]
        if stage in ("pretrain", "compress"):
            return [self.train_job(stage)]
        if stage == "finetune":
            n = self.opts.finetune_tasks
            if n > 1:
                shards = self.array_job("finetune-shards", "finetune", n, f'"finetune.shard=$part/{n}"', "finetune.shard",
                                        gpus=gpu1, saving=True)
                rest = self.task_job("finetune", "finetune", gpus=gpu1, saving=True)
                rest.after = [shards.key]
                return [shards, rest]
            return [self.task_job("finetune", "finetune", gpus=gpu1, saving=True)]
        return [self.task_job(stage, stage)]

    def plan(self) -> list[Job]:
        from kompakt.pipeline import STAGES

        jobs: list[Job] = []
        last: dict[str, str] = {}  # stage -> key (or id:) of the job that completes it
        for stage in self.stages():
            d = str(self.stage_dir(stage))
            if d in self.queued:  # already pending or running: depend on it, submit nothing new
                last[stage] = f"id:{self.queued[d]}"
                continue
            ups = [last[u] for u in STAGES[stage].upstream_for(self.recipe)[0] if u in last]
            for k, job in enumerate(self.jobs_for(stage)):
                job.stage_dir = d
                job.after = (ups if k == 0 else []) + job.after  # a stage's later jobs wait for its first
                jobs.append(job)
            last[stage] = jobs[-1].key
        return jobs


# Options of `kompakt infer` passed on to every job of `--slurm N` (the scale-out flags are the plan's own).
INFER_OPTIONS = ("task", "runtime", "device", "max_length", "threads", "text_field", "id_field", "txt_document",
                 "pooling", "normalize", "float16", "truncate", "batch_tokens", "rows_per_chunk")


class InferPlanner(Renderer):
    """`kompakt infer --slurm N`: an array of N tasks, task i doing input files i, i+N, ... (`--shard i/N`),
    then one task that does whatever the array left (a task killed at its time limit, say) and completes the
    manifest. That last job runs after the array whatever its outcome (afterany): its own run is the check."""

    def __init__(self, args, inputs: list[Path], out_dir: Path, opts: Options):
        super().__init__(opts, "infer", Path(out_dir).resolve() / "slurm")
        self.n = int(args.slurm)
        if self.n < 1:
            raise ConfigError(f"--slurm {self.n}: give the number of array tasks, at least 1")
        words = [str(Path(args.model).resolve()), *[str(p.resolve()) for p in inputs], "--out", str(Path(out_dir).resolve())]
        for key in INFER_OPTIONS:
            value = getattr(args, key, None)
            if value is True:
                words.append("--" + key.replace("_", "-"))
            elif value not in (None, False):
                words += ["--" + key.replace("_", "-"), str(value)]
        self.words = words

    def command(self, extra: list[str] = ()) -> str:
        return _q([*entry_point(self.profile, "kompakt", "kompakt.cli"), "infer", *self.words]) + \
            "".join(" " + e for e in extra)

    def plan(self) -> list[Job]:
        gpus = 1 if self.opts.gpus_per_node else 0
        cpus = self.profile.get("CPUS_PER_TASK") or None
        values = lambda d, step, **more: self._values("infer", d, step, **more)  # noqa: E731
        rank = shlex.quote(str(RANK_SH))
        d = self.directives("shards", gpus=gpus > 0, array=self.n, saving=False, cpus=cpus, gpus_per_node=gpus)
        shard = '--shard "$part/%d"' % self.n  # unquoted by _q: the shell fills in $part
        step = f"{self.srun('--ntasks=1')} bash {rank} {self.command([shard])}"
        shards = Job("infer-shards", "infer", "array",
                     render("array.sbatch", values(d, step, ARRAY_SIZE=str(self.n), SHARD_KEY="--shard")), [],
                     array=self.n, stage_dir=self.words[self.words.index("--out") + 1])
        d = self.directives("finish", gpus=gpus > 0, saving=False, cpus=cpus, gpus_per_node=gpus)
        step = f"{self.srun('--ntasks=1')} bash {rank} {self.command()}"
        last = Job("infer-finish", "infer", "task", render("task.sbatch", values(d, step)), [shards.key],
                   stage_dir=shards.stage_dir, dependency="afterany")
        return [shards, last]
