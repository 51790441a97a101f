"""`kompakt slurm` against a real single-node Slurm cluster (tests/slurm/cluster.sh: Debian's
slurm-wlm and munge, as root), through the real CLI and sbatch:

- a 2-task pretraining job of the demo recipe (2 processes over gloo) leaves checkpoints and an export;
- `scontrol requeue` mid-run, and separately a short time limit whose warning signal
  (`--signal=B:USR1@45`) arrives mid-run, each resume from the checkpoint saved on the way out and
  end with the same weights as the uninterrupted job (the latter launched by torchrun with the c10d
  rendezvous, the others by srun, one task per rank);
- a job that fails for another reason is not requeued;
- a data_prep array of 2 tasks plus the merge job gives the corpus of a single process.

The three pretraining jobs run side by side (the cluster offers more CPU slots than cores; their
steps are slowed to a known 0.25 s, `KOMPAKT_TEST_STEP_SECONDS`, so Slurm's 30-second time-limit
checks fall mid-run on any machine). `make test` installs the packages; where they cannot be
installed (not root, no apt) the tests skip with the reason, unless KOMPAKT_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
KOMPAKT = str(Path(sys.executable).with_name("kompakt"))
RECIPE = REPO / "recipes" / "demo-nb.yaml"
STEPS = 360
TINY = ["data.num_proc=1", "tokenizer.vocab_size=1000", "tokenizer.num_proc=1", "model.hidden_size=32",
        "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64", "model.embedding_size=32",
        "model.max_position_embeddings=64", f"pretrain.max_steps={STEPS}", "pretrain.objective.max_seq_len=64",
        "pretrain.data.tokens_per_micro_batch=256", "pretrain.data.global_batch_tokens=512",
        "pretrain.run.save_every=100", "pretrain.run.log_every=5", "pretrain.run.eval_every=0",
        "pretrain.run.eval_batches=2", "pretrain.engine.precision=fp32"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")

pytestmark = pytest.mark.slurm


def _why_no_slurm() -> str | None:
    if os.geteuid() != 0:
        return "a real Slurm cluster needs root (slurmd runs jobs as their user)"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; make test does it as root)"
    return None


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**out, "OMP_NUM_THREADS": "1", **extra}


def sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=kw.pop("env", env()), **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = _why_no_slurm()
    if why:
        if os.environ.get("KOMPAKT_REQUIRE_SLURM") == "1":
            pytest.fail(f"KOMPAKT_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    sh("bash", CLUSTER_SH, "start", d)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(d / "slurm.conf")
    yield d
    subprocess.run(["scancel", "--full", "--quiet", "-u", "root"], env=env(), capture_output=True)
    sh("bash", CLUSTER_SH, "stop", d, check=False)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, demo_docs) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "nb.txt.gz"
    path.write_bytes(gzip.compress("\n\n".join(demo_docs[:800]).encode()))
    return path


def overrides(corpus: Path, run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"data.inputs=[{corpus}]", *TINY]


def submit(corpus, run_dir, *args, **env_extra) -> list[str]:
    out = sh(KOMPAKT, "slurm", "submit", RECIPE, *overrides(corpus, run_dir), *args, cwd=REPO, env=env(**env_extra))
    return [line.split("job ")[1].split()[0] for line in out.stdout.splitlines() if line.startswith("submitted")]


def job(job_id: str) -> dict:
    out = sh("scontrol", "show", "job", "-o", job_id)
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)


def wait_done(job_id: str, timeout: float = 420) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = job(job_id)
        if j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return j
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job(job_id)['JobState']} after {timeout} s")


def log_of(run_dir: Path, stage: str = "pretrain") -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob(f"*-{stage}-*.out")))


def metrics_step(run_dir: Path) -> int:
    rows = [p for p in run_dir.glob("pretrain-*/metrics.jsonl")]
    if not rows:
        return 0
    lines = [json.loads(line) for line in rows[0].read_text().splitlines() if line.strip()]
    return max((r.get("step", 0) for r in lines), default=0)


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    (export,) = run_dir.glob("pretrain-*/export")
    return load_file(export / "model.safetensors")


@pytest.fixture(scope="module")
def upstream(cluster, corpus, tmp_path_factory) -> Path:
    """prepare + tokenizer of the tiny demo recipe, built once outside Slurm and copied per job."""
    base = tmp_path_factory.mktemp("base") / "run"
    sh(KOMPAKT, "tokenizer", RECIPE, *overrides(corpus, base), cwd=REPO)
    return base


@pytest.fixture(scope="module")
def pretrain_jobs(cluster, corpus, upstream, tmp_path_factory):
    """The uninterrupted job, the one requeued with scontrol and the one whose time limit warns, side by
    side; a thread does to each interrupted job what the test says, at the right moment."""
    root = tmp_path_factory.mktemp("pretrain")
    runs = {}
    for name in ("plain", "requeue", "timelimit"):
        runs[name] = root / name
        shutil.copytree(upstream, runs[name])
    slow = {"KOMPAKT_TEST_STEP_SECONDS": "0.25"}
    ids = {"plain": submit(corpus, runs["plain"], "--stage", "pretrain", "--procs-per-node", "2", **slow)[0],
           "requeue": submit(corpus, runs["requeue"], "--stage", "pretrain", "--procs-per-node", "2", **slow)[0],
           # torchrun reports its own status, not the workers' 75: the requeue marker carries it.
           "timelimit": submit(corpus, runs["timelimit"], "--stage", "pretrain", "--procs-per-node", "2",
                               "--launcher", "torchrun", "--time", "2", "--warn-seconds", "45", **slow)[0]}
    events: dict[str, object] = {}

    def drive():
        deadline = time.time() + 400
        while time.time() < deadline and len(events) < 2:
            if "requeued_at" not in events and metrics_step(runs["requeue"]) >= 40:
                sh("scontrol", "requeue", ids["requeue"])
                events["requeued_at"] = metrics_step(runs["requeue"])
            if "raised" not in events and int(job(ids["timelimit"]).get("Restarts", 0)) >= 1:
                # The first run was warned, saved and requeued itself; let the second one finish.
                sh("scontrol", "update", f"JobId={ids['timelimit']}", "TimeLimit=20")
                events["raised"] = True
            time.sleep(0.5)

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    done = {name: wait_done(i) for name, i in ids.items()}
    t.join(timeout=5)
    return {"runs": runs, "ids": ids, "done": done, "events": events}


def test_a_2_task_pretraining_job_leaves_checkpoints_and_an_export(pretrain_jobs):
    run, j = pretrain_jobs["runs"]["plain"], pretrain_jobs["done"]["plain"]
    assert j["JobState"] == "COMPLETED" and j["Restarts"] == "0", j
    (stage,) = run.glob("pretrain-*")
    assert json.loads((stage / "manifest.json").read_text())["complete"] is True
    assert (stage / "checkpoints" / f"step-{STEPS:08d}" / "complete").exists()
    assert (stage / "export" / "config.json").is_file()
    host = sh("hostname", "-s").stdout.strip()
    lines = log_of(run).splitlines()
    # Every line of the ranks is prefixed with node and rank; two processes trained.
    assert any(line.startswith(f"[{host} r0] pretrain: 360 steps") for line in lines), lines[-5:]
    assert any(re.match(rf"\[{host} r0\] │ processes\s+│\s+2 │", line) for line in lines)
    # The ledger and `kompakt slurm status` know the job and the stage.
    out = sh(KOMPAKT, "slurm", "status", run, "--json").stdout
    report = json.loads(out)
    assert [(r["key"], r["summary"]) for r in report["jobs"]] == [("pretrain", "COMPLETED")]
    assert report["stages"][stage.name]["complete"] is True


def test_scontrol_requeue_mid_run_resumes_to_the_same_weights(pretrain_jobs):
    import torch

    run, j = pretrain_jobs["runs"]["requeue"], pretrain_jobs["done"]["requeue"]
    assert "requeued_at" in pretrain_jobs["events"], "the run never got to step 40"
    assert j["JobState"] == "COMPLETED" and int(j["Restarts"]) == 1, j
    log = log_of(run)
    assert "pretrain: stopped by signal at step" in log  # SIGTERM from the requeue: saved on the way out
    assert "pretrain: resumed from " in log and "/checkpoints/step-" in log
    plain, resumed = weights(pretrain_jobs["runs"]["plain"]), weights(run)
    assert plain.keys() == resumed.keys()
    for k in plain:
        assert torch.equal(plain[k], resumed[k]), k


def test_a_short_time_limit_warns_saves_requeues_and_resumes_to_the_same_weights(pretrain_jobs):
    import torch

    run, j = pretrain_jobs["runs"]["timelimit"], pretrain_jobs["done"]["timelimit"]
    assert j["JobState"] == "COMPLETED" and int(j["Restarts"]) >= 1, j
    log = log_of(run)
    assert "SIGUSR1: forwarding to the job step" in log  # Slurm's warning, at the batch shell
    stopped = [line for line in log.splitlines() if "pretrain: stopped by signal at step" in line]
    assert stopped and int(stopped[0].split("at step ")[1].split(";")[0].replace(",", "")) > 0, stopped
    assert "saved; requeueing job" in log and "pretrain: resumed from " in log
    plain, resumed = weights(pretrain_jobs["runs"]["plain"]), weights(run)
    for k in plain:
        assert torch.equal(plain[k], resumed[k]), k


def test_a_job_that_fails_otherwise_is_not_requeued(cluster, corpus, upstream, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(upstream, run)
    (job_id,) = submit(corpus, run, "--stage", "pretrain", "--procs-per-node", "2", "pretrain.max_steps=4", "pretrain.schedule.warmup_steps=1",
                       KOMPAKT_TEST_KILL_AT="before_export")
    j = wait_done(job_id, timeout=180)
    assert j["JobState"] == "FAILED" and j["Restarts"] == "0", j
    assert not any(run.glob("pretrain-*/manifest.json"))
    assert "requeueing" not in log_of(run)


def test_a_data_prep_array_and_its_merge_give_the_single_process_corpus(cluster, corpus, tmp_path, demo_docs):
    # Four input files, so that each of the two parts reads two.
    inputs = tmp_path / "in"
    inputs.mkdir()
    docs = demo_docs[:1200]
    for k in range(4):
        (inputs / f"p{k}.txt.gz").write_bytes(gzip.compress("\n\n".join(docs[k::4]).encode()))
    common = [f"data.inputs=[{inputs}/*.txt.gz]", "data.num_proc=1"]
    single = tmp_path / "single"
    sh(KOMPAKT, "prepare", RECIPE, f"run_dir={single}", *common, cwd=REPO)
    arr = tmp_path / "array"
    out = sh(KOMPAKT, "slurm", "submit", RECIPE, f"run_dir={arr}", *common, "data.num_shards=2", "--stage", "prepare",
             cwd=REPO).stdout
    ids = [line.split("job ")[1].split()[0] for line in out.splitlines() if line.startswith("submitted")]
    assert [line.split(":")[0] for line in out.splitlines()] == ["submitted prepare-parts", "submitted prepare"]
    merge = wait_done(ids[1], timeout=300)
    assert merge["JobState"] == "COMPLETED", (merge, log_of(arr, "prepare"))
    tasks = sh("scontrol", "show", "job", "-o", ids[0]).stdout.splitlines()
    assert len(tasks) == 2 and all("JobState=COMPLETED" in t for t in tasks)
    assert len(list(arr.glob("prepare_part-*/manifest.json"))) == 2
    (a,), (b,) = list(single.glob("prepare-*")), list(arr.glob("prepare-*"))
    files = sorted(p.name for p in (a / "corpus").glob("*.parquet"))
    assert files and files == sorted(p.name for p in (b / "corpus").glob("*.parquet"))
    for name in files:
        assert (a / "corpus" / name).read_bytes() == (b / "corpus" / name).read_bytes(), name
