"""The evaluation report: report.md, report.html, results.json and PNG plots from one results dict.

`write_report(results, out_dir)` reads this shape (scores are fractions as `kompakt.eval.metrics`
returns them; the report shows them x 100; retention is already in %):

    {
      "suite": "demo-nb",
      "device": "AMD EPYC 7B13 (2 cores)",       # where latency and throughput were measured
      "versions": {"torch": "2.13.0", ...},
      "git_commit": "2db3821",
      "models": {                                # optional: figures per model, shared by all tasks
        "teacher": {"params": 110_000_000, "params_no_embeddings": 85_000_000, "disk_bytes": 440_000_000,
                    "latency_ms": 12.3,          # batch 1, median, on `device`
                    "throughput": 81.0,          # sequences/s
                    "peak_memory_mb": 610.0},    # MiB
      },
      "tasks": {
        "sentiment": {
          "type": "classification",              # optional
          "metric": "macro_f1",
          "num_train": 8000, "num_test": 2000,   # optional; num_train is where "all" sits on the curve
          "majority": 0.43,                      # optional: score of always predicting the top label
          "teacher": "teacher",                  # optional; else the model with role "teacher", else
                                                 # a model named "teacher"
          "models": {
            "teacher": {
              "role": "teacher",                 # "teacher" | "student" (default) | "baseline"
              "scores": [0.912, 0.905, ...],     # one per fine-tuning seed
              "interval": {"mean", "std", "low", "high", "n_seeds", ...},   # stats.bootstrap_interval
              "retention": {"mean", "low", "high"},   # stats.retention; absent for the teacher
              "learning_curve": {100: {"mean", "low", "high"}, 1000: {...}, "all": {...}},
              ... any of the "models" figures above, overriding them for this task
            },
          },
          "baselines": {"tfidf": {"scores", "interval", "learning_curve"}, "bilstm": {"note": "..."}},
          "pairs": [{"a": "student-6L", "b": "teacher", **stats.paired_bootstrap(...)}],
        },
      },
      "baselines": {"sentiment": {"tfidf": {...}}},   # optional, the same entries keyed by task first
    }

A model entry needs "scores" or "interval"; every other field may be missing (shown as "-", left out
of plots). A baseline entry with only a "note" is printed as that note. Learning-curve keys may be ints
or their strings (as after a JSON round trip).

Plots are 800 x 500 px PNGs (8 x 5 in at 100 dpi), drawn on matplotlib's Agg canvas without touching
pyplot's global state; per task: score vs batch-1 CPU latency with the Pareto front of teacher and
students, score vs parameters, and learning curves (score vs train size, log x, bands = intervals).
A difference to the teacher that the paired bootstrap does not find significant is marked "≈".
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from kompakt.errors import DataError

FIG_SIZE_IN = (8.0, 5.0)
FIG_DPI = 100
NOT_SIGNIFICANT = "≈"
_NS_NOTE = ("≈: the difference to the teacher is not significant (paired bootstrap over test examples and "
            "fine-tuning seeds, p ≥ 0.05); on this test set the two models cannot be told apart.")
_COLUMNS = ("model", "role", "score", "seeds", "retention %", "Δ vs teacher", "params", "params w/o emb.",
            "disk MB", "latency ms", "seq/s", "peak MiB")


# ---------------------------------------------------------------- reading the results


_FIGURES = ("params", "params_no_embeddings", "disk_bytes", "latency_ms", "throughput", "peak_memory_mb")


def _models(task_name: str, task: dict, results: dict) -> tuple[dict[str, dict], list[str]]:
    """The task's models (size and speed figures filled in from results["models"]) and then its
    baselines (role "baseline", from task["baselines"] or results["baselines"][task]), in the order
    given; plus the notes of baselines that have no scores ("tfidf: does not support qa")."""
    figures = results.get("models") or {}
    models = {}
    for name, entry in (task.get("models") or {}).items():
        shared = figures.get(name) if isinstance(figures.get(name), dict) else {}
        models[name] = {**{k: shared[k] for k in _FIGURES if k in shared}, **(entry or {})}
    notes = []
    baselines = {**((results.get("baselines") or {}).get(task_name) or {}), **(task.get("baselines") or {})}
    for name, entry in baselines.items():
        if isinstance(entry, dict) and ("scores" in entry or "interval" in entry):
            models.setdefault(name, {**entry, "role": "baseline"})
        elif isinstance(entry, dict) and entry.get("note"):
            notes.append(f"{name}: {entry['note']}")
    for name, entry in models.items():
        if not isinstance(entry, dict) or not ("scores" in entry or "interval" in entry):
            raise DataError(f"results: task {task_name!r}, model {name!r} has neither 'scores' nor "
                            "'interval'")
    return models, notes


def _teacher(task: dict, models: dict[str, dict]) -> str | None:
    """task["teacher"], else the model whose role is "teacher", else a model named "teacher"."""
    if task.get("teacher") in models:
        return task["teacher"]
    named = next((n for n, m in models.items() if m.get("role") == "teacher"), None)
    return named or ("teacher" if "teacher" in models else None)


def _summary(entry: dict) -> dict:
    """mean, std, low, high, n_seeds of a model entry, from its interval or else its per-seed scores."""
    interval = dict(entry.get("interval") or {})
    scores = [float(s) for s in entry.get("scores") or []]
    if "mean" not in interval and scores:
        interval["mean"] = sum(scores) / len(scores)
    if "std" not in interval and len(scores) > 1:
        m = sum(scores) / len(scores)
        interval["std"] = math.sqrt(sum((s - m) ** 2 for s in scores) / (len(scores) - 1))
    interval.setdefault("n_seeds", len(scores) or None)
    return interval


def _pair_against(task: dict, model: str, teacher: str | None) -> dict | None:
    """The paired test of `model` against the teacher, as model - teacher."""
    if teacher is None or model == teacher:
        return None
    for p in task.get("pairs") or []:
        if p.get("a") == model and p.get("b") == teacher:
            return p
        if p.get("a") == teacher and p.get("b") == model:
            return {**p, "diff": -p["diff"], "low": -p["high"], "high": -p["low"]}
    return None


def _curve(entry: dict, n_train: int | None) -> list[tuple[float, str, dict]]:
    """(x, label, point) of a learning curve, ascending; "all" at n_train (else twice the largest size)."""
    points, all_point = [], None
    for key, point in (entry.get("learning_curve") or {}).items():
        if str(key) == "all":
            all_point = point
        elif str(key).isdigit():
            points.append((float(key), str(key), point))
    points.sort(key=lambda p: p[0])
    if all_point is not None:
        x = float(n_train) if n_train else (2 * points[-1][0] if points else 1.0)
        if not points or x > points[-1][0]:
            points.append((x, f"all ({int(x)})" if n_train else "all", all_point))
    return points


# ---------------------------------------------------------------- formatting


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}"


def _num(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{float(x):,.{digits}f}"


def _count(x: Any) -> str:
    """110_000_000 -> "110.0M", 4_400_000 -> "4.4M", 950_000 -> "950k"."""
    if x is None:
        return "-"
    x = float(x)
    if abs(x) >= 1e9:
        return f"{x / 1e9:.2f}B"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.1f}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.0f}k"
    return f"{x:.0f}"


def _score_cell(s: dict) -> str:
    """"91.2 ± 0.4 [90.1, 92.3]" (x 100)."""
    if s.get("mean") is None:
        return "-"
    text = _pct(s["mean"])
    if s.get("std") is not None and (s.get("n_seeds") or 0) > 1:  # one seed has no spread to show
        text += f" ± {100 * float(s['std']):.1f}"
    if s.get("low") is not None and s.get("high") is not None:
        text += f" [{_pct(s['low'])}, {_pct(s['high'])}]"
    return text


def _retention_cell(entry: dict, is_teacher: bool) -> str:
    if is_teacher:
        return "100 (reference)"
    r = entry.get("retention")
    if not r or r.get("mean") is None:
        return "-"
    text = f"{float(r['mean']):.1f}"
    if r.get("low") is not None and r.get("high") is not None:
        text += f" [{float(r['low']):.1f}, {float(r['high']):.1f}]"
    return text


def _delta_cell(pair: dict | None) -> tuple[str, bool]:
    """("-1.3 [-2.0, -0.6]" or "≈ -0.4 [-1.1, 0.3]", not significant?)."""
    if pair is None:
        return "-", False
    text = f"{100 * pair['diff']:+.1f} [{100 * pair['low']:+.1f}, {100 * pair['high']:+.1f}]"
    if pair.get("significant"):
        return text, False
    return f"{NOT_SIGNIFICANT} {text}", True


def _rows(task: dict, models: dict[str, dict]) -> tuple[list[list[str]], list[bool]]:
    """One row of strings per model (columns `_COLUMNS`) and whether its Δ cell is not significant."""
    teacher = _teacher(task, models)
    rows, ns = [], []
    for name, entry in models.items():
        s = _summary(entry)
        delta, not_sig = _delta_cell(_pair_against(task, name, teacher))
        role = "teacher" if name == teacher else (entry.get("role") or "student")
        disk = entry.get("disk_bytes")
        rows.append([name, role, _score_cell(s), str(s.get("n_seeds") or "-"),
                     _retention_cell(entry, name == teacher), delta, _count(entry.get("params")),
                     _count(entry.get("params_no_embeddings")), _num(None if disk is None else disk / 1e6),
                     _num(entry.get("latency_ms"), 2), _num(entry.get("throughput")),
                     _num(entry.get("peak_memory_mb"), 0)])
        ns.append(not_sig)
    return rows, ns


def _retrieval_rows(task: dict) -> tuple[list[str], list[list[str]]]:
    """A retrieval task's table: every metric for each fine-tuned model, each model untrained and BM25, with
    the index kind, build time and queries/s (query encoding and search) where measured."""
    if task.get("type") != "retrieval":
        return [], []
    from kompakt.eval.metrics import RETRIEVAL as names
    header = ["system", *names, "index", "build s", "queries/s"]
    rows = []
    systems = [(m, v.get("metrics"), (task.get("retrieval") or {}).get(m, {})) for m, v in task["models"].items()]
    systems += [(f"{m} untrained", v.get("metrics"), {}) for m, v in (task.get("untrained") or {}).items()]
    bm = (task.get("baselines") or {}).get("bm25") or {}
    systems += [("BM25", bm.get("metrics"), {"index": "inverted", "index_build_s": bm.get("index_build_s"),
                                            "queries_per_s": bm.get("queries_per_s")})]
    for name, ms, fig in systems:
        if not ms:
            continue
        rows.append([_md(name), *(_pct(ms.get(k)) for k in names), str(fig.get("index", "-")),
                     _num(fig.get("index_build_s"), 3), _num(fig.get("queries_per_s"), 0)])
    return header, rows


def _retrieval_notes(task: dict, metric: str) -> list[str]:
    """One plain sentence per fine-tuned model: above or below BM25 and its untrained self on the metric."""
    if task.get("type") != "retrieval":
        return []
    bm = ((task.get("baselines") or {}).get("bm25") or {}).get("interval")
    out = []
    for m, v in task["models"].items():
        mean = v["interval"]["mean"]
        parts = []
        if bm:
            pair = next((p for p in task.get("pairs") or [] if p.get("a") == m and p.get("b") == "bm25"), None)
            sig = "" if pair is None else (", significant" if pair.get("significant") else ", not significant") + \
                f" (paired bootstrap p = {pair.get('p_value', float('nan')):.3f})"
            parts.append(f"{'above' if mean > bm['mean'] else 'below'} BM25 ({_pct(mean)} vs {_pct(bm['mean'])}{sig})")
        un = (task.get("untrained") or {}).get(m)
        if un:
            u = un["interval"]["mean"]
            parts.append(f"{'above' if mean > u else 'not above'} the untrained encoder ({_pct(u)})")
        if parts:
            out.append(f"{m} fine-tuned, {metric}: " + "; ".join(parts))
    return out


def _pair_rows(task: dict) -> list[list[str]]:
    out = []
    for p in task.get("pairs") or []:
        verdict = (f"{p['a'] if p['diff'] > 0 else p['b']} higher" if p.get("significant")
                   else f"{NOT_SIGNIFICANT} not significant")
        out.append([str(p.get("a")), str(p.get("b")), f"{100 * p['diff']:+.1f}",
                    f"[{100 * p['low']:+.1f}, {100 * p['high']:+.1f}]", f"{p['p_value']:.3f}", verdict])
    return out


# ---------------------------------------------------------------- plots


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE_IN, dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    # No "Software" text chunk: the same results give the same bytes on any matplotlib build.
    fig.savefig(tmp, format="png", dpi=FIG_DPI, metadata={"Software": None})
    os.replace(tmp, path)


def _points(models: dict[str, dict], key: str) -> list[tuple[str, str, float, dict]]:
    out = []
    for name, entry in models.items():
        s = _summary(entry)
        if entry.get(key) is not None and s.get("mean") is not None:
            out.append((name, entry.get("role") or "student", float(entry[key]), s))
    return out


def _scatter(ax, points, teacher: str | None) -> None:
    for name, role, x, s in points:
        y = 100 * s["mean"]
        err = None
        if s.get("low") is not None and s.get("high") is not None:
            err = [[max(0.0, y - 100 * s["low"])], [max(0.0, 100 * s["high"] - y)]]
        style = {"teacher": ("*", 14, "tab:red"), "baseline": ("s", 7, "tab:gray")}.get(
            "teacher" if name == teacher else role, ("o", 8, "tab:blue"))
        ax.errorbar([x], [y], yerr=err, fmt=style[0], markersize=style[1], color=style[2], capsize=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.margins(x=0.12, y=0.08)  # room for the names beside the outermost points


def _log_if_wide(ax, xs: list[float]) -> None:
    if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")


def _pareto(points) -> list[tuple[float, float]]:
    """(latency, score) of the points that no other point beats on both (lower latency, higher score)."""
    front, best = [], -math.inf
    for _, _, x, s in sorted(points, key=lambda p: (p[2], -p[3]["mean"])):
        if s["mean"] > best:
            front.append((x, 100 * s["mean"]))
            best = s["mean"]
    return front


def _plot_pareto(path: Path, task_name: str, metric: str, models: dict, teacher: str | None, device: str):
    points = _points(models, "latency_ms")
    if not points:
        return None
    fig, ax = _figure()
    _scatter(ax, points, teacher)
    front = _pareto([p for p in points if p[1] != "baseline"])
    if len(front) > 1:
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="tab:green", alpha=0.7,
                label="Pareto front (teacher and students)")
        ax.legend(loc="lower right", fontsize=8)
    _log_if_wide(ax, [p[2] for p in points])
    ax.set_xlabel(f"latency, batch 1 (ms){', ' + device if device else ''}")
    ax.set_ylabel(f"{metric} x 100")
    ax.set_title(f"{task_name}: score vs CPU latency")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def _plot_params(path: Path, task_name: str, metric: str, models: dict, teacher: str | None):
    points = _points(models, "params")
    if not points:
        return None
    fig, ax = _figure()
    _scatter(ax, points, teacher)
    _log_if_wide(ax, [p[2] for p in points])
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{metric} x 100")
    ax.set_title(f"{task_name}: score vs parameters")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


def _plot_curves(path: Path, task_name: str, metric: str, models: dict, n_train: int | None):
    curves = [(name, entry.get("role"), _curve(entry, n_train)) for name, entry in models.items()]
    curves = [c for c in curves if c[2]]
    if not curves:
        return None
    fig, ax = _figure()
    ticks: dict[float, str] = {}
    for name, role, points in curves:
        xs = [x for x, _, _ in points]
        ys = [100 * p["mean"] for _, _, p in points]
        line = ax.plot(xs, ys, marker="o", linestyle="--" if role == "baseline" else "-", label=name)[0]
        if all(p.get("low") is not None and p.get("high") is not None for _, _, p in points):
            lows = [100 * p["low"] for _, _, p in points]
            highs = [100 * p["high"] for _, _, p in points]
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15, linewidth=0)
        ticks.update({x: label for x, label, _ in points})
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(f"{metric} x 100")
    ax.set_title(f"{task_name}: learning curves (bands: bootstrap intervals)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path


# ---------------------------------------------------------------- writing


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^\w.-]+", "-", str(name)).strip("-.") or "task"
    slug, k = base, 2
    while slug in taken:
        slug, k = f"{base}-{k}", k + 1
    taken.add(slug)
    return slug


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    """JSON-ready copy: string keys (learning-curve sizes mix ints and "all"), lists, plain numbers."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def _md(text: Any) -> str:
    """Text safe in a Markdown table cell or heading: no "|" column breaks, no "<" opening HTML tags."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _md_table(header, rows) -> list[str]:
    return ["| " + " | ".join(map(_md, header)) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(_md, r)) + " |" for r in rows]


def _html_table(header, rows) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"]
    for r in rows:
        cells = []
        for c in r:
            ns = str(c).startswith(NOT_SIGNIFICANT)
            attr = ' class="ns" title="not significant (p ≥ 0.05)"' if ns else ""
            cells.append(f"<td{attr}>{html.escape(str(c))}{'<sup>1</sup>' if ns else ''}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
td.ns{background:#fff6d5}.note{color:#555;font-size:13px}img{display:block;margin:1em 0;border:1px solid #eee}
code{background:#f3f3f3;padding:1px 4px}"""


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.html, results.json and the PNG plots into `out_dir` (created if needed).

    `results` has the shape in the module docstring. Returns the written paths: "markdown", "html",
    "json", and per task "pareto:<task>", "params:<task>", "learning_curve:<task>" for each plot that
    had data (a task without latencies has no Pareto plot). Files are written to a temporary name and
    renamed. DataError for a results dict without tasks or a model without scores.
    """
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict) or not results["tasks"]:
        raise DataError("results has no 'tasks'; the report needs at least one task with models")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suite = str(results.get("suite") or "suite")
    device = str(results.get("device") or "")
    paths: dict[str, Path] = {}

    versions = ", ".join(f"{k} {v}" for k, v in sorted((results.get("versions") or {}).items()))
    meta = [("commit", results.get("git_commit") or "-"), ("device", device or "-"),
            ("versions", versions or "-")]
    intro = ("Scores are the task metric x 100 on the test split: mean ± std across fine-tuning seeds "
             "[percentile interval of a bootstrap that resamples test examples and seeds together]. "
             "Retention is a student's score as % of the teacher's, with a paired bootstrap interval. "
             "Δ vs teacher is student - teacher x 100 [paired bootstrap interval]. Latency is the median "
             "batch-1 time, throughput sequences/s, both on the device above.")
    md = [f"# kompakt report: {_md(suite)}", ""] + [f"- {k}: `{v}`" if k == "commit" else f"- {k}: {_md(v)}"
                                               for k, v in meta] + ["", intro, ""]
    body = [f"<h1>kompakt report: {html.escape(suite)}</h1>", "<ul>"] + [
        f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in meta] + [
        "</ul>", f"<p>{html.escape(intro)}</p>"]

    zero = results.get("zero_shot") or {}
    if zero:
        title = "Zero-shot: MLM pseudo-perplexity on held-out task text (lower is better; same tokenizer only)"
        header = ["model", "pseudo-perplexity", "log-prob per token", "tokens"]
        rows = [[_md(m), f"{z['pseudo_perplexity']:.1f}", f"{z['pll_per_token']:.3f}", f"{z['tokens']:,}"]
                for m, z in zero.items()]
        md += [f"## {title}", ""] + _md_table(header, rows) + [""]
        body += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]

    taken: set[str] = set()
    for task_name, task in results["tasks"].items():
        if not isinstance(task, dict):
            raise DataError(f"results: task {task_name!r} is not a mapping")
        metric = str(task.get("metric") or "score")
        models, notes = _models(task_name, task, results)
        teacher = _teacher(task, models)
        slug = _slug(task_name, taken)
        rows, ns_flags = _rows(task, models)
        header = list(_COLUMNS)
        header[2] = f"{metric} x 100"
        facts = [str(task["type"])] if task.get("type") else []
        facts += [metric] + [f"{task[k]:,} {what}" for k, what in (("num_train", "train"),
                                                                    ("num_test", "test"))
                             if isinstance(task.get(k), int)]
        title = f"{task_name} ({', '.join(facts)})"
        md += [f"## {_md(title)}", ""] + _md_table(header, rows) + [""]
        body += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
        if any(ns_flags):
            md += [f"{_NS_NOTE}", ""]
            body.append(f'<p class="note"><sup>1</sup> {html.escape(_NS_NOTE)}</p>')
        if task.get("majority") is not None:
            notes.append(f"always predicting the most frequent train label: {_pct(task['majority'])}")
        notes += _retrieval_notes(task, metric)
        for note in notes:
            md += [f"- {_md(note)}"]
            body.append(f'<p class="note">{html.escape(note)}</p>')
        md += [""] if notes else []
        ret_header, ret_rows = _retrieval_rows(task)
        if ret_rows:
            md += ["Retrieval metrics x 100 (test, mean over seeds); index and speed of the fine-tuned encoders:", ""]
            md += _md_table(ret_header, ret_rows) + [""]
            body += ["<h3>Retrieval metrics</h3>", _html_table(ret_header, ret_rows)]
        pair_rows = _pair_rows(task)
        if pair_rows:
            pair_header = ["a", "b", "a - b x 100", "interval", "p", "verdict"]
            md += ["Paired differences:", ""] + _md_table(pair_header, pair_rows) + [""]
            body += ["<h3>Paired differences</h3>", _html_table(pair_header, pair_rows)]
        plots = [
            ("pareto", "score vs CPU latency",
             _plot_pareto(out_dir / f"{slug}-pareto.png", task_name, metric, models, teacher, device)),
            ("params", "score vs parameters",
             _plot_params(out_dir / f"{slug}-params.png", task_name, metric, models, teacher)),
            ("learning_curve", "learning curves",
             _plot_curves(out_dir / f"{slug}-learning-curve.png", task_name, metric, models,
                          task.get("num_train"))),
        ]
        width, height = int(FIG_SIZE_IN[0] * FIG_DPI), int(FIG_SIZE_IN[1] * FIG_DPI)
        for kind, alt, path in plots:
            if path is None:
                continue
            paths[f"{kind}:{task_name}"] = path
            md += [f"![{_md(task_name)}: {alt}]({path.name})", ""]
            body.append(f'<img src="{html.escape(path.name)}" width="{width}" height="{height}" '
                        f'alt="{html.escape(f"{task_name}: {alt}")}">')

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>kompakt report: {html.escape(suite)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    paths["markdown"] = out_dir / "report.md"
    paths["html"] = out_dir / "report.html"
    paths["json"] = out_dir / "results.json"
    _write_text(paths["markdown"], "\n".join(md).rstrip() + "\n")
    _write_text(paths["html"], page)
    _write_text(paths["json"], json.dumps(_jsonable(results), indent=2, ensure_ascii=False) + "\n")
    return paths
