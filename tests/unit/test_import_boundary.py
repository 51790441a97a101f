"""kompakt/models/ imports torch only: never transformers, deepspeed, accelerate or torch.distributed.

Scans every module's import statements (including ones inside functions) with the ast module."""

import ast
from pathlib import Path

FORBIDDEN = ("transformers", "deepspeed", "accelerate", "torch.distributed")
MODELS = Path(__file__).resolve().parents[2] / "kompakt" / "models"


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_models_import_no_infrastructure():
    files = sorted(MODELS.glob("*.py"))
    assert len(files) >= 5, files
    bad = [f"{f.name}: {m}" for f in files for m in imported_modules(f)
           if any(m == x or m.startswith(x + ".") for x in FORBIDDEN)]
    assert not bad, f"kompakt/models must import torch only, found {bad}"


def test_scanner_catches_a_forbidden_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from torch import distributed\n    import transformers.models\n")
    assert {"torch.distributed", "transformers.models"} <= set(imported_modules(f))
