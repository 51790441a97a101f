"""Terminal output shared by the stages: status lines on stderr, tables through rich."""

from __future__ import annotations

import sys
from typing import Iterable, Sequence

from rich.console import Console
from rich.table import Table

# Status goes to stderr so that `--json` output on stdout stays one clean JSON object.
console = Console(stderr=True, highlight=False, soft_wrap=True)


def _rank() -> int:
    from kompakt.dist import detect_rank

    return detect_rank()


def info(msg: str) -> None:
    """One status line, printed by rank 0 only."""
    if _rank() == 0:
        console.print(msg, markup=False)


def warn(msg: str) -> None:
    console.print(f"warning: {msg}", markup=False, style="yellow")


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]], file=None) -> None:
    """Print a table (to stderr unless `file` is given, e.g. sys.stdout for bench output)."""
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[f"{x:,}" if isinstance(x, int) else (f"{x:.4g}" if isinstance(x, float) else str(x)) for x in r])
    (Console(file=file, highlight=False) if file is not None else console).print(t)


def err_line(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
