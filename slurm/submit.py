"""`kompakt slurm submit` and `kompakt slurm status`: sbatch the plan, keep a ledger, report on it.

Every submission appends one line per job to `<run_dir>/slurm/jobs.jsonl` (job id, stage, stage
directory, the jobs it waits for, the script as submitted, which lies beside it). `status` reads the
ledger, asks Slurm for each job's state (`scontrol`, then `sacct` for jobs slurmctld has forgotten)
and looks at each stage directory's manifest. A stage whose job is still pending or running is not
submitted again: a later submission depends on that job instead.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from kompakt.errors import ConfigError, KompaktError
from kompakt.runs import is_complete

from .jobs import InferPlanner, Job, Options, Planner

LEDGER = "jobs.jsonl"
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"}


def read_ledger(log_dir: Path) -> list[dict]:
    path = log_dir / LEDGER
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill during a write: the rest still counts
            continue
    return rows


def _append(log_dir: Path, row: dict) -> None:
    with open(log_dir / LEDGER, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


def _slurm_tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise ConfigError(f"{name} not found: run this on a Slurm login node (or use --dry-run to see the scripts)")
    return exe


def job_states(job_id: str) -> list[dict]:
    """[{state, reason, restarts, exit_code}] of a job (one row per array task); [] when Slurm has no record."""
    try:
        out = subprocess.run([_slurm_tool("scontrol"), "show", "job", "-o", str(job_id)], capture_output=True,
                             text=True, timeout=30)
    except (subprocess.TimeoutExpired, ConfigError):
        out = None
    rows = []
    if out is not None and out.returncode == 0:
        for line in out.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "JobState" in fields:
                rows.append({"state": fields["JobState"], "reason": fields.get("Reason", ""),
                             "restarts": int(fields.get("Restarts", 0) or 0), "exit_code": fields.get("ExitCode", ""),
                             "task": fields.get("ArrayTaskId")})
    if rows:
        return rows
    if shutil.which("sacct"):  # slurmctld forgets finished jobs after MinJobAge; accounting remembers
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,ExitCode"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                state, _, code = line.partition("|")
                if state:
                    rows.append({"state": state.split()[0], "reason": "", "restarts": 0, "exit_code": code, "task": None})
    return rows


def queued_stages(log_dir: Path) -> dict[str, str]:
    """stage dir -> id of the job that completes it, for stages whose job is still pending or running."""
    out = {}
    for row in read_ledger(log_dir):
        if row.get("completes_stage") and any(s["state"] in ACTIVE for s in job_states(row["job_id"])):
            out[row["stage_dir"]] = row["job_id"]
    return out


def describe(jobs: list[Job]) -> str:
    """A dry run: every script in submission order, each headed by what it waits for."""
    parts = []
    for n, job in enumerate(jobs, 1):
        after = ", ".join(a[3:] + " (queued)" if a.startswith("id:") else a for a in job.after) or "nothing"
        parts.append(f"# ===== job {n}/{len(jobs)}: {job.key} ({job.kind}"
                     f"{f', {job.array} tasks' if job.array else ''}), after {after} =====\n{job.final_script()}")
    return "\n".join(parts)


def submit(recipe: str, overrides: list[str], opts, dry_run: bool = False) -> list[dict]:
    """Plan and submit (or, with dry_run, print) the jobs; returns the ledger rows written."""
    planner = Planner(recipe, overrides, opts)
    if not dry_run:
        planner.queued = queued_stages(planner.log_dir)
    jobs = planner.plan()
    if dry_run:
        print(describe(jobs) if jobs else "# nothing to submit: every stage asked for is complete")
        return []
    if not jobs:
        print("nothing to submit: every stage asked for is complete or already queued")
        return []
    return sbatch_jobs(jobs, planner.log_dir)


def sbatch_jobs(jobs: list[Job], log_dir: Path) -> list[dict]:
    """sbatch each job in order, its dependencies filled with the ids of those before it; one ledger line
    per job in `log_dir/jobs.jsonl`, the script as submitted beside it."""
    sbatch = _slurm_tool("sbatch")
    log_dir.mkdir(parents=True, exist_ok=True)
    completing = {}
    for job in jobs:
        completing[job.stage] = job.key  # the last job of each stage completes it
    ids: dict[str, str] = {}
    rows = []
    for job in jobs:
        script = job.final_script(ids)
        tmp = log_dir / f".{job.key}.sbatch.tmp"
        tmp.write_text(script, encoding="utf-8")
        out = subprocess.run([sbatch, "--parsable", str(tmp)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            tmp.unlink(missing_ok=True)
            why = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
            done = ", ".join(f"{k} {v}" for k, v in ids.items())
            raise KompaktError(f"sbatch refused the {job.key} job: {why}"
                               + (f" (already submitted: {done}; `scancel` them or rerun, which skips queued stages)"
                                  if ids else ""))
        job_id = out.stdout.strip().split(";")[0]
        ids[job.key] = job_id
        path = log_dir / f"{job.key}-{job_id}.sbatch"
        tmp.rename(path)
        row = {"job_id": job_id, "key": job.key, "stage": job.stage, "kind": job.kind, "array": job.array,
               "stage_dir": job.stage_dir, "after": [a[3:] if a.startswith("id:") else ids[a] for a in job.after],
               "completes_stage": completing[job.stage] == job.key, "script": str(path),
               "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
        _append(log_dir, row)
        rows.append(row)
        after = f" after {','.join(row['after'])}" if row["after"] else ""
        print(f"submitted {job.key}: job {job_id}{after} ({path})")
    return rows


def _summary(states: list[dict]) -> str:
    if not states:
        return "no record (finished long ago, or on another cluster)"
    counts: dict[str, int] = {}
    for s in states:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    text = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items())
    reasons = sorted({s["reason"] for s in states if s["state"] == "PENDING" and s["reason"] not in ("", "None")})
    restarts = max(s["restarts"] for s in states)
    return text + (f" ({', '.join(reasons)})" if reasons else "") + (f", restarts {restarts}" if restarts else "")


def status(run: str, overrides: list[str]) -> dict:
    """The run's stages (complete or not) and its jobs (Slurm's state). RUN: a recipe or a run directory."""
    path = Path(run)
    stages: dict[str, dict] = {}
    if path.is_file():
        from kompakt.config import load_recipe
        from kompakt.pipeline import STAGES, Pipeline

        p = Pipeline(load_recipe(path, overrides))
        log_dir = p.run_dir.resolve() / "slurm"
        for name, stage in STAGES.items():
            if stage.enabled(p.recipe):
                d = p.resolve(name)[0]
                stages[name] = {"dir": str(d.resolve()), "complete": is_complete(d)}
    elif path.is_dir():
        from kompakt.pipeline import STAGES

        log_dir = path.resolve() / "slurm"
        for d in sorted(path.iterdir()):  # <stage>-<hash> folders; a run may hold several of a stage
            if d.is_dir() and d.name.rsplit("-", 1)[0] in STAGES:
                stages[d.name] = {"dir": str(d.resolve()), "complete": is_complete(d)}
    else:
        raise ConfigError(f"{run} is neither a recipe file nor a run directory")
    jobs = []
    for row in read_ledger(log_dir):
        states = job_states(row["job_id"])
        jobs.append({**row, "states": states, "summary": _summary(states)})
    return {"log_dir": str(log_dir), "stages": stages, "jobs": jobs}


def print_status(report: dict) -> None:
    print(f"stages ({report['log_dir'].rsplit('/', 1)[0]}):")
    for name, s in report["stages"].items():
        stage = name.rsplit("-", 1)[0]  # a run directory's stages are keyed by folder name
        print(f"  {stage:<12} {'complete' if s['complete'] else 'not complete':<13} {Path(s['dir']).name}")
    if not report["jobs"]:
        print(f"jobs: none submitted (no {Path(report['log_dir']) / LEDGER})")
        return
    print("jobs:")
    for j in report["jobs"]:
        after = f" after {','.join(j['after'])}" if j["after"] else ""
        print(f"  {j['job_id']:<8} {j['key']:<16} {j['summary']}{after}")


def submit_infer(args, inputs: list[Path], out_dir: Path) -> list[dict]:
    """`kompakt infer --slurm N`: render the array and its finishing job (slurm/jobs.py InferPlanner) and
    sbatch them, or print them with --dry-run."""
    opts = Options(stage="infer", profile=args.profile, gpus_per_node=1 if str(args.device).startswith("cuda") else 0)
    jobs = InferPlanner(args, inputs, out_dir, opts).plan()
    if args.dry_run:
        print(describe(jobs))
        return []
    return sbatch_jobs(jobs, Path(out_dir).resolve() / "slurm")
