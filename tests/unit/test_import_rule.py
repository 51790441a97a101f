"""The dependency rule of DESIGN.md section 2, scanned with ast over every import (inside functions too):

- a stage package never imports another stage (eval may import finetune);
- no stage imports the dispatch (kompakt.cli, kompakt.pipeline, kompakt.bench): that closes a cycle;
- the core (kompakt/) imports no stage, except the dispatch modules, which exist to call them;
- slurm/ (kompakt.slurm, a tool beside the CLI) reads the pipeline's declarations but imports no stage.
`kompakt/models/` importing torch only is tests/unit/test_import_boundary.py.
"""

from __future__ import annotations

from pathlib import Path

from test_import_boundary import imported_modules

REPO = Path(__file__).resolve().parents[2]
STAGES = {"data_prep": "data_prep", "tokenization": "tokenization", "pretrain": "pretrain", "compress": "compress",
          "finetune": "finetune", "eval": "eval", "infer": "infer"}
ALLOWED = {("eval", "finetune")}
DISPATCH = {"kompakt.cli", "kompakt.pipeline", "kompakt.bench"}


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "kompakt" and parts[1] in STAGES else None


def violations() -> list[str]:
    bad = []
    for stage, folder in STAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            for m in imported_modules(path):
                other = _stage_of(m)
                if other and other != stage and (stage, other) not in ALLOWED:
                    bad.append(f"{folder}/{path.name} imports stage {m}")
                if any(m == d or m.startswith(d + ".") for d in DISPATCH):
                    bad.append(f"{folder}/{path.name} imports the dispatch {m}")
    for path in sorted((REPO / "slurm").rglob("*.py")):
        for m in imported_modules(path):
            if _stage_of(m):
                bad.append(f"slurm/{path.name} imports stage {m}")
    for path in sorted((REPO / "kompakt").rglob("*.py")):
        module = "kompakt." + path.relative_to(REPO / "kompakt").with_suffix("").as_posix().replace("/", ".")
        if module in DISPATCH:
            continue
        for m in imported_modules(path):
            if _stage_of(m):
                bad.append(f"{path.relative_to(REPO)} (core) imports stage {m}")
    return bad


def test_stages_import_only_the_core():
    bad = violations()
    assert not bad, "\n".join(bad)


def test_the_scanner_sees_a_stage_importing_another(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from kompakt.pretrain.data import PackedLoader\n")
    assert _stage_of(imported_modules(f)[0]) == "pretrain"
