"""`kompakt slurm submit --dry-run`: the rendered chain, its dependencies and directives, bad input.
No cluster needed (tests/slurm/ runs the scripts on a real one)."""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

import pytest

from kompakt.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "demo-nb.yaml")


@pytest.fixture
def corpus(tmp_path, demo_docs) -> Path:
    path = tmp_path / "nb.txt.gz"
    path.write_bytes(gzip.compress("\n\n".join(demo_docs[:300]).encode()))
    return path


def dry_run(capsys, *args) -> list[dict]:
    assert main(["slurm", "submit", RECIPE, *args, "--dry-run"]) == 0
    text = capsys.readouterr().out
    jobs = []
    for block in re.split(r"^# ===== ", text, flags=re.M)[1:]:
        head, _, script = block.partition("\n")
        key = head.split(": ", 1)[1].split(" (")[0]
        directives = re.findall(r"^#SBATCH (\S+)", script, flags=re.M)
        dep = next((d.split(":", 1)[1] for d in directives if d.startswith("--dependency=")), "")
        jobs.append({"key": key, "script": script, "directives": directives,
                     "after": re.findall(r"<([^>]+)>", dep)})
    return jobs


def test_all_renders_the_pipeline_as_a_chain_with_the_right_dependencies(capsys, corpus, tmp_path):
    jobs = dry_run(capsys, "--stage", "all", f"run_dir={tmp_path / 'run'}", f"data.inputs=[{corpus}]",
                   "data.num_shards=2", "--finetune-tasks", "3", "--nodes", "2", "--gpus-per-node", "4")
    by = {j["key"]: j for j in jobs}
    assert list(by) == ["prepare-parts", "prepare", "tokenizer", "pretrain", "compress", "finetune-shards", "finetune",
                        "eval"]
    assert {k: j["after"] for k, j in by.items()} == {
        "prepare-parts": [], "prepare": ["prepare-parts"], "tokenizer": ["prepare"], "pretrain": ["tokenizer"],
        "compress": ["tokenizer", "pretrain"],  # its teacher is this recipe's pretrained model
        "finetune-shards": ["pretrain", "compress"], "finetune": ["finetune-shards"], "eval": ["finetune"]}
    for key, job in by.items():
        d = job["directives"]
        # A failed upstream cancels its dependants instead of leaving them pending for ever.
        assert ("--kill-on-invalid-dep=yes" in d) == bool(job["after"]), key
        # Only the stages that save and exit 75 are warned before the time limit.
        assert any(x.startswith("--signal=B:USR1@") for x in d) == (key in ("pretrain", "compress", "finetune-shards",
                                                                             "finetune")), key
        assert "--requeue" in d and f"--output={tmp_path / 'run' / 'slurm'}/" in " ".join(d), key
        syntax = subprocess.run(["bash", "-n"], input=job["script"], text=True, capture_output=True)
        assert syntax.returncode == 0, (key, syntax.stderr)
        assert "set -euo pipefail" in job["script"] and f"data.inputs=[{corpus}]" in job["script"]
    assert "--array=0-1" in by["prepare-parts"]["directives"]
    assert '"data.shard_index=$part"' in by["prepare-parts"]["script"]
    assert "--array=0-2" in by["finetune-shards"]["directives"]
    assert '"finetune.shard=$part/3"' in by["finetune-shards"]["script"]
    train = by["pretrain"]["directives"]
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"} <= set(train)
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))" in by["pretrain"]["script"]
    # data_prep and the tokenizer get the worker processes the recipe asks for (num_proc: 2).
    assert "--cpus-per-task=2" in by["prepare-parts"]["directives"] and "--cpus-per-task=2" in by["tokenizer"]["directives"]
    assert "--cpus-per-task=1" in by["eval"]["directives"]
    # CPU-only jobs ask for no GPU; a fine-tuning task asks for one.
    assert not any("gpu" in x for x in by["tokenizer"]["directives"])
    assert "--gpus-per-node=1" in by["finetune-shards"]["directives"]


def test_complete_stages_get_no_job_and_a_stage_brings_its_incomplete_upstream(capsys, corpus, tmp_path):
    run = [f"run_dir={tmp_path / 'run'}", f"data.inputs=[{corpus}]", "data.num_proc=1"]
    jobs = dry_run(capsys, "--stage", "pretrain", *run)
    assert [j["key"] for j in jobs] == ["prepare", "tokenizer", "pretrain"]
    assert main(["prepare", RECIPE, *run]) == 0
    capsys.readouterr()
    jobs = dry_run(capsys, "--stage", "pretrain", *run)
    assert [(j["key"], j["after"]) for j in jobs] == [("tokenizer", []), ("pretrain", ["tokenizer"])]


def test_torchrun_launcher_uses_the_c10d_rendezvous_on_the_first_host(capsys, corpus, tmp_path):
    jobs = dry_run(capsys, "--stage", "pretrain", f"run_dir={tmp_path}", f"data.inputs=[{corpus}]", "--nodes", "4",
                   "--gpus-per-node", "8", "--launcher", "torchrun", "--profile", "lumi-g", "--account", "project_1")
    script = jobs[-1]["script"]
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=56", "--account=project_1",
            "--partition=standard-g"} <= set(jobs[-1]["directives"])
    assert 'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))' in script
    assert '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in script
    assert "--nproc-per-node=8" in script and "--signals-to-handle=SIGINT" in script
    assert "module load LUMI/24.03 partition/G" in script and "export NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3" in script
    assert "singularity exec" in script
    # The CPU jobs go to the CPU partition.
    assert "--partition=small" in jobs[0]["directives"]


HYPERPARAMETERS = re.compile(r"\b(lr|max_steps|hidden_size|num_layers|vocab_size|mask_rate|warmup_steps|"
                             r"global_batch_tokens|seed|epochs)\b")
PERSONAL = re.compile(r"(/home/|/users/|/Users/|~/|/work/|/scratch/project_\d|project_\d{6,}|nn\d{4}k\b)")


def test_templates_and_profiles_hold_no_hyperparameters_and_no_personal_paths():
    files = sorted((REPO / "slurm" / "templates").iterdir()) + sorted((REPO / "slurm" / "clusters").glob("*.env"))
    assert len(files) >= 8
    for path in files:
        text = "\n".join(line for line in path.read_text().splitlines())
        assert not HYPERPARAMETERS.search(text), (path.name, HYPERPARAMETERS.search(text).group(0))
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not PERSONAL.search(code), (path.name, PERSONAL.search(code).group(0))
        assert not re.search(r"^ACCOUNT=\S", text, flags=re.M), path.name  # the account is the user's to give


@pytest.mark.parametrize("args, message", [
    (["--stage", "pretrian"], "--stage 'pretrian'; use all or one of prepare, tokenizer, pretrain"),
    (["--stage", "all", "--profile", "nowhere"], "no cluster profile 'nowhere'; use one of local, lumi-g, saga"),
    (["--stage", "pretrain", "--gpus-per-node", "4", "--procs-per-node", "2"], "runs one process per GPU"),
    (["--stage", "pretrain", "--nodes", "0"], "--nodes must be at least 1"),
])
def test_bad_requests_are_one_line_and_exit_2(capsys, corpus, tmp_path, args, message):
    assert main(["slurm", "submit", RECIPE, f"run_dir={tmp_path}", f"data.inputs=[{corpus}]", *args, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_malformed_profile_names_its_line(capsys, corpus, tmp_path):
    profile = tmp_path / "mine.env"
    profile.write_text("PARTITION=gpu\nthis is not a setting\n")
    assert main(["slurm", "submit", RECIPE, f"run_dir={tmp_path}", f"data.inputs=[{corpus}]", "--stage", "all",
                 "--profile", str(profile), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{profile}:2: expected KEY=value" in err


def test_submit_without_sbatch_says_where_to_run_it(capsys, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert main(["slurm", "submit", RECIPE, f"run_dir={tmp_path}", f"data.inputs=[{corpus}]", "--stage", "tokenizer"]) == 2
    assert "sbatch not found: run this on a Slurm login node" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")))
def test_every_released_recipe_renders_for_a_gpu_cluster(capsys, tmp_path, name):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "Dette er en liten tekst."}\n', encoding="utf-8")
    jobs = dry_run(capsys, "--stage", "all", f"run_dir={tmp_path / 'run'}", f"data.inputs=[{corpus}]", "--nodes", "4",
                   "--gpus-per-node", "4", "--profile", "saga", "--account", "nn0000k")
    keys = [j["key"] for j in jobs]
    assert "pretrain" in keys and keys.index("tokenizer") < keys.index("pretrain")
    for job in jobs:
        assert subprocess.run(["bash", "-n"], input=job["script"], text=True).returncode == 0, job["key"]
    assert {"--nodes=4", "--gpus-per-node=4", "--partition=accel"} <= set(jobs[keys.index("pretrain")]["directives"])
