"""The eval stage: the finetune jobs' test predictions scored, beside baselines, with honest intervals.

Reads top to bottom: the finetune manifest and every job's result; per task the gold test labels;
per model and train size the scores of every seed, the bootstrap interval over test examples and
seeds together (kompakt/eval/stats.py), retention against the teacher, paired tests between the
models and against the best baseline; the baselines (TF-IDF + logistic regression, a BiLSTM) on the
same splits and learning-curve sizes, with the same seeds; per model its size and CPU speed; then
results.json, the report (Markdown, HTML, PNG plots) and the figures written into each fine-tuned
model's card.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kompakt.finetune_config import EvalConfig, FinetuneConfig
from kompakt.log import info, table
from kompakt.runs import git_commit, package_versions, write_json_atomic
from kompakt.speed import device_name

from kompakt.eval import baselines as B
from kompakt.eval import stats


def gold_of(kind: str, rows: list[dict]) -> list:
    if kind == "token_classification":
        return [r["tags"] for r in rows]
    if kind == "qa":
        return [r["answers"] for r in rows]
    if kind == "retrieval":
        return [r["relevant"] for r in rows]
    return [r["label"] for r in rows]


def metric_options(task, suite_language: str | None = None) -> dict:
    """Metric options of a task: SQuAD's English articles are not dropped from answers in other languages."""
    if task.type == "qa" and (suite_language or "en") != "en":
        return {"articles": ()}
    if "f1" in ([task.metric] + list(task.metrics or [])):
        return {"positive": task.positive}
    return {}


def model_figures(folder: Path, measure: bool) -> dict:
    """Parameters (with and without the embeddings), disk size, and CPU latency/throughput/peak memory
    measured in a fresh process (so one model's memory is not another's)."""
    from kompakt.speed import folder_params

    figures = {"disk_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")), **folder_params(folder)}
    if measure:
        out = subprocess.run([sys.executable, "-m", "kompakt.speed", str(folder)], capture_output=True, text=True,
                             timeout=600)
        if out.returncode == 0 and out.stdout.strip():
            figures.update(json.loads(out.stdout.strip().splitlines()[-1]))
        else:
            info(f"eval: speed of {folder} not measured ({out.stderr.strip().splitlines()[-1:] or 'no output'})")
    return figures


def run(cfg: EvalConfig, ft_cfg: FinetuneConfig, finetune_dir: Path, out_dir: Path, *, recipe_name: str) -> Path:
    """Score, compare and report into `out_dir` (the caller builds it atomically)."""
    from kompakt.finetune.stage import read_results
    from kompakt.finetune.tasks import load_suite, load_task, training_rows

    from kompakt.eval.report import write_report

    t0 = time.perf_counter()
    manifest = json.loads((finetune_dir / "manifest.json").read_text())
    results = read_results(finetune_dir)
    suite = load_suite(ft_cfg.suite)
    tasks = [t for t in suite.tasks if t.name in {x["name"] for x in manifest["tasks"]}]
    models = manifest["models"]
    out: dict = {"suite": suite.name, "recipe": recipe_name, "tasks": {}, "models": {}, "device": device_name(),
                 "versions": package_versions(), "git_commit": git_commit(), "seeds": ft_cfg.seeds,
                 "n_boot": cfg.n_boot}
    for name, folder in models.items():
        out["models"][name] = {"folder": folder, **model_figures(Path(folder), cfg.measure_speed)}
    # Zero-shot: every MLM's pseudo-perplexity on the suite's test text (held out of pretraining).
    from kompakt.eval.pll import pseudo_perplexity

    datas = {t.name: load_task(t, suite.folder) for t in tasks}  # read once, for the zero-shot text and the scores
    texts = heldout_texts(tasks, datas)
    out["zero_shot"] = {}
    for name, folder in models.items():
        if name in (manifest.get("distilled") or {}):
            continue  # the student's own folder, measured under its own name
        z = pseudo_perplexity(Path(folder), texts)
        if z is not None:
            out["zero_shot"][name] = z
    for task in tasks:
        data = datas[task.name]
        test = data.splits["test"]
        gold = gold_of(task.type, test)
        opts = metric_options(task, getattr(suite, "language", None))
        metric = task.metric
        # The baselines train on what the models were fine-tuned on: finetune.max_train_examples keeps the first
        # examples (after a learning-curve subsample), so a capped run compares like with like.
        cap = ft_cfg.max_train_examples
        train = training_rows(data.splits["train"], "all", 0, cap)
        entry = {"type": task.type, "metric": metric, "num_test": len(test), "num_train": len(train),
                 "models": {}, "baselines": {}, "pairs": []}
        preds: dict[str, dict[str, list]] = {}  # model -> size -> [per-seed predictions]
        for path, r in results.items():
            job = r["job"]
            if job["task"] == task.name:
                preds.setdefault(job["model"], {}).setdefault(job["size"], []).append(
                    (job["seed"], r["predictions"]["test"], r))
        for model, sizes in preds.items():
            seeded = sorted(sizes["all"], key=lambda x: x[0])
            by_seed = [p for _, p, _ in seeded]
            grid = {s: r[0][2]["dev_loss"] for s, r in sizes.items() if s.startswith("grid")}
            m = {"scores": [stats_score(metric, gold, p, opts) for p in by_seed],
                 **({"grid_dev_loss": grid, "grid_choice": seeded[0][2].get("grid_choice")} if grid else {}),
                 "interval": stats.bootstrap_interval(gold, by_seed, metric, n_boot=cfg.n_boot, **opts),
                 "steps": [r["steps"] for _, _, r in seeded], "seconds": [r["seconds"] for _, _, r in seeded]}
            curve = {}
            for size, runs in sizes.items():
                if size.startswith("grid"):
                    continue  # hyper-parameter search runs, not learning-curve points
                ps = [p for _, p, _ in sorted(runs, key=lambda x: x[0])]
                iv = stats.bootstrap_interval(gold, ps, metric, n_boot=max(100, cfg.n_boot // 5), **opts)
                curve[str(size)] = {"mean": iv["mean"], "low": iv["low"], "high": iv["high"]}
            m["learning_curve"] = curve
            entry["models"][model] = m
        # --- baselines, same splits and seeds; learning-curve sizes as the curve models
        base_preds: dict[str, list] = {}
        if task.type == "retrieval":
            retrieval_extras(entry, task, data, preds, gold, metric, opts, cfg.n_boot, base_preds)
        for name in ([] if task.type == "retrieval" else cfg.baselines):
            if name == "tfidf":
                fn = B.tfidf_baseline
            else:
                def fn(kind, train, dev, test_rows, seed):
                    return B.bilstm_baseline(kind, train, dev, test_rows, seed, epochs=cfg.bilstm_epochs)
            seeds = range(1) if name == "tfidf" else range(ft_cfg.seeds)  # TF-IDF + LR is deterministic
            runs = [fn(task.type, train, data.splits["dev"], test, seed) for seed in seeds]
            if any(r is None for r in runs):
                entry["baselines"][name] = {"note": f"{name} does not support {task.type}"}
                continue
            base_preds[name] = runs
            curve = {}
            for size in ft_cfg.learning_curve:
                if size < len(data.splits["train"]):
                    ps = [fn(task.type, training_rows(data.splits["train"], size, s, cap), data.splits["dev"], test, s)
                          for s in list(seeds)[:cfg.curve_seeds]]
                    iv = stats.bootstrap_interval(gold, ps, metric, n_boot=max(100, cfg.n_boot // 5), **opts)
                    curve[str(size)] = {"mean": iv["mean"], "low": iv["low"], "high": iv["high"]}
            iv = stats.bootstrap_interval(gold, runs, metric, n_boot=cfg.n_boot, **opts)
            curve["all"] = {"mean": iv["mean"], "low": iv["low"], "high": iv["high"]}
            entry["baselines"][name] = {"scores": [stats_score(metric, gold, p, opts) for p in runs], "interval": iv,
                                        "learning_curve": curve}
        majority = majority_score(task.type, metric, train, gold, opts)
        if majority is not None:
            entry["majority"] = majority
        # --- retention and paired tests
        all_preds = {m: [p for _, p, _ in sorted(s["all"], key=lambda x: x[0])] for m, s in preds.items()}
        if "teacher" in all_preds:
            for m in all_preds:
                if m != "teacher":
                    entry["models"][m]["retention"] = stats.retention(gold, all_preds["teacher"], all_preds[m], metric,
                                                                      n_boot=cfg.n_boot, **opts)
        names = list(all_preds)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                entry["pairs"].append({"a": a, "b": b, **stats.paired_bootstrap(gold, all_preds[a], all_preds[b], metric,
                                                                                n_boot=cfg.n_boot, **opts)})
        if base_preds:
            best = max(base_preds, key=lambda n: entry["baselines"][n]["interval"]["mean"])
            for m in names:
                entry["pairs"].append({"a": m, "b": best, **stats.paired_bootstrap(gold, all_preds[m], base_preds[best],
                                                                                   metric, n_boot=cfg.n_boot, **opts)})
        out["tasks"][task.name] = entry
        table(f"eval {task.name} ({metric})", ["model", "mean", "95% interval", "retention"],
              [(m, f"{v['interval']['mean']:.4f}", f"[{v['interval']['low']:.4f}, {v['interval']['high']:.4f}]",
                f"{v['retention']['mean']:.1f}%" if "retention" in v else "-") for m, v in entry["models"].items()]
              + [(f"baseline: {n}", f"{v['interval']['mean']:.4f}", f"[{v['interval']['low']:.4f}, "
                  f"{v['interval']['high']:.4f}]", "-") for n, v in entry["baselines"].items() if "interval" in v])
    out["timings"] = {"total_s": round(time.perf_counter() - t0, 2)}
    write_json_atomic(out_dir / "results.json", out)
    paths = write_report(out, out_dir)
    cards = write_cards(out, finetune_dir)
    info(f"eval: {len(paths)} report files; scores added to {cards} fine-tuned model card(s)")
    return out_dir


def retrieval_extras(entry: dict, task, data, preds: dict, gold: list, metric: str, opts: dict, n_boot: int,
                     base_preds: dict) -> None:
    """A retrieval task's extra rows: BM25 over the same corpus as the baseline (deterministic, one run), every
    model before fine-tuning (the encoder as its jobs started), all five retrieval metrics per model, and the
    index build time and queries per second of the fine-tuned encoders."""
    from kompakt.eval.metrics import RETRIEVAL
    from kompakt.finetune.retrieval import BM25

    t0 = time.perf_counter()
    bm25 = BM25(data.corpus)
    t1 = time.perf_counter()
    ranked = bm25.search([r["query"] for r in data.splits["test"]], task.retrieval.top_k)
    t2 = time.perf_counter()
    iv = stats.bootstrap_interval(gold, [ranked], metric, n_boot=n_boot, **opts)
    entry["baselines"]["bm25"] = {"scores": [stats_score(metric, gold, ranked, opts)], "interval": iv,
                                  "learning_curve": {"all": {k: iv[k] for k in ("mean", "low", "high")}},
                                  "metrics": {m: stats_score(m, gold, ranked, opts) for m in RETRIEVAL},
                                  "index_build_s": round(t1 - t0, 3),
                                  "queries_per_s": round(len(ranked) / max(t2 - t1, 1e-9), 1)}
    base_preds["bm25"] = [ranked]
    entry["untrained"], entry["retrieval"] = {}, {}
    for model, sizes in preds.items():
        runs = sorted(sizes.get("all", []), key=lambda x: x[0])
        if not runs:
            continue
        by_seed = [p for _, p, _ in runs]
        entry["models"][model]["metrics"] = {m: float(np.mean([stats_score(m, gold, p, opts) for p in by_seed]))
                                             for m in RETRIEVAL}
        start = [r["untrained_predictions"]["test"] for _, _, r in runs if "untrained_predictions" in r]
        if start:
            iv = stats.bootstrap_interval(gold, start[:1], metric, n_boot=n_boot, **opts)
            entry["untrained"][model] = {"interval": iv,
                                         "metrics": {m: stats_score(m, gold, start[0], opts) for m in RETRIEVAL}}
        figs = [r["retrieval"] for _, _, r in runs if "retrieval" in r]
        if figs:
            entry["retrieval"][model] = {"index": figs[0]["index"], "num_docs": figs[0]["num_docs"],
                                         **{k: float(np.median([f[k] for f in figs]))
                                            for k in ("corpus_embed_s", "index_build_s", "search_queries_per_s",
                                                      "queries_per_s")}}
    table(f"eval {task.name}: retrieval ({', '.join(RETRIEVAL)}, test)", ["system", *RETRIEVAL],
          [(m, *(f"{v['metrics'][k]:.4f}" for k in RETRIEVAL)) for m, v in entry["models"].items() if "metrics" in v]
          + [(f"{m} untrained", *(f"{v['metrics'][k]:.4f}" for k in RETRIEVAL)) for m, v in entry["untrained"].items()]
          + [("baseline: bm25", *(f"{entry['baselines']['bm25']['metrics'][k]:.4f}" for k in RETRIEVAL))])


def heldout_texts(tasks, datas: dict, limit: int = 200) -> list[str]:
    """Up to `limit` test texts of the suite's tasks (sentences, joined tokens, QA contexts)."""
    texts: list[str] = []
    for task in tasks:
        for r in datas[task.name].splits["test"]:
            texts.append(r.get("text") or " ".join(r.get("tokens") or []) or r.get("context") or r.get("query") or "")
            if len(texts) >= limit:
                return texts
    return texts


def stats_score(metric: str, gold: list, pred: list, opts: dict) -> float:
    from kompakt.eval.metrics import compute

    return compute(metric, gold, pred, **opts)


def majority_score(kind: str, metric: str, train: list[dict], gold: list, opts: dict) -> float | None:
    """The score of always predicting the most frequent training label (classification tasks)."""
    if kind not in ("classification", "pair_classification"):
        return None
    from collections import Counter

    top = Counter(r["label"] for r in train).most_common(1)[0][0]
    return stats_score(metric, gold, [top] * len(gold), opts)


def write_cards(results: dict, finetune_dir: Path) -> int:
    """Append each task's scores to the card (README.md) of every kept fine-tuned model."""
    n = 0
    for task, entry in results["tasks"].items():
        for model, m in entry["models"].items():
            folder = finetune_dir / "models" / task / model
            if not folder.is_dir():
                continue
            iv = m["interval"]
            lines = [f"# {model} fine-tuned on {task} ({results['suite']})", "",
                     "| | |", "|---|---|",
                     f"| task | {task} ({entry['type']}), {entry['num_train']:,} training and {entry['num_test']:,} test examples |",
                     f"| {entry['metric']} | {iv['mean']:.4f} ± {iv['std']:.4f} over {iv['n_seeds']} seeds, 95% interval "
                     f"[{iv['low']:.4f}, {iv['high']:.4f}] (bootstrap over test examples and seeds) |"]
            if "retention" in m:
                r = m["retention"]
                lines.append(f"| retention | {r['mean']:.1f}% of the teacher [{r['low']:.1f}, {r['high']:.1f}] |")
            for name, b in entry["baselines"].items():
                if "interval" in b:
                    lines.append(f"| baseline {name} | {b['interval']['mean']:.4f} |")
            lines.append("\nLoad with `sentence_transformers.SentenceTransformer(folder)`, or `transformers.AutoModel` "
                         "with the pooling of 1_Pooling/config.json." if entry["type"] == "retrieval" else
                         "\nLoad with the `transformers` AutoModelFor... class of the task; labels are in config.json.")
            (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
            n += 1
    return n
