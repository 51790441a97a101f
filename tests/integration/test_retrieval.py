"""Retrieval end to end on the offline ordb task (an example phrase finds its dictionary article): a tiny
encoder fine-tuned a few steps ranks better than the same encoder untrained, every objective (in-batch,
mined hard negatives, the quadruplet loss, label enhancement) trains to finite losses, the exported folder
loads with stock sentence-transformers and AutoModel and embeds exactly as kompakt's own inference does,
and the eval stage reports BM25 and the untrained encoder beside the fine-tuned one, and says which is
ahead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine_ready():
    from kompakt import dist
    from kompakt.engine import init_distributed

    init_distributed(dist.setup_env())


@pytest.fixture(scope="module")
def ordb():
    """The shipped task cut to 384 training, 64 dev and 96 test queries over a corpus of their articles plus
    600 others (every judged article stays in the corpus)."""
    from kompakt.finetune.tasks import load_suite, load_task

    suite = load_suite("demo-nb-retrieval")
    data = load_task(suite.task("ordb-infonce"), suite.folder)
    splits = {"train": data.splits["train"][:384], "dev": data.splits["dev"][:64], "test": data.splits["test"][:96]}
    judged = {d for rows in splits.values() for e in rows for d in e["relevant"]}
    others = [d for d in data.corpus if d not in judged][:600]
    corpus = {d: data.corpus[d] for d in data.corpus if d in judged or d in set(others)}
    return suite, splits, corpus


def job(task, splits, corpus, model, work: Path, keep: Path | None = None, **train):
    from kompakt.loop import StopFlag
    from kompakt.train_config import EngineConfig, RunControl

    from kompakt.finetune.train import run_job

    task = task.model_copy(update={"train": task.train.model_copy(update=train)})
    with StopFlag() as stop:
        return run_job(model, task, splits, [], seed=0, work_dir=work, engine_cfg=EngineConfig(),
                       run_cfg=RunControl(save_every=10**9, log_every=5), stop=stop, keep_dir=keep, corpus=corpus)


def test_fine_tuning_beats_the_untrained_encoder_and_the_export_loads_in_sentence_transformers(
        ordb, tiny_mlm, engine_ready, tmp_path):
    from kompakt.eval.metrics import compute
    from kompakt.infer.runtime import load_predictor

    from kompakt.finetune.retrieval import BM25

    suite, splits, corpus = ordb
    task = suite.task("ordb-infonce")
    out = job(task, splits, corpus, tiny_mlm, tmp_path / "job", keep=tmp_path / "model", epochs=4, lr=3e-3,
              batch_size=32, patience=0)
    assert out["stopped"] == "done" and out["steps"] == 4 * 12
    gold = [e["relevant"] for e in splits["test"]]
    trained = compute("recall_at_10", gold, out["predictions"]["test"])
    untrained = compute("recall_at_10", gold, out["untrained_predictions"]["test"])
    bm25 = compute("recall_at_10", gold, BM25(corpus).search([e["query"] for e in splits["test"]], 100))
    print(f"recall@10 on {len(gold)} test queries over {len(corpus)} documents: fine-tuned {trained:.3f}, "
          f"untrained {untrained:.3f}, BM25 {bm25:.3f}")
    assert trained > untrained + 0.05
    assert all(len(r) == 100 for r in out["predictions"]["test"])
    fig = out["retrieval"]
    assert fig["index"] == "flat" and fig["num_docs"] == len(corpus) and fig["queries_per_s"] > 0

    # The export: stock sentence-transformers and AutoModel, no remote code, same vectors as kompakt infer's.
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    folder = tmp_path / "model"
    assert not (tmp_path / "model.tmp").exists()
    texts = [e["query"] for e in splits["test"][:16]] + [corpus[d] for d in list(corpus)[:16]]
    st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=False)
    ours = load_predictor(folder, task="embed", runtime="torch", device="cpu", max_length=256)
    assert (ours.pooling, ours.normalize) == ("mean", True)  # read from the folder's sentence-transformers modules
    got = np.stack([r["embedding"] for r in ours.predict(texts)])
    want = st.encode(texts, batch_size=8, convert_to_numpy=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.allclose(np.linalg.norm(want, axis=1), 1.0, atol=1e-5)
    assert type(AutoModel.from_pretrained(str(folder))).__name__ == "BertModel"


@pytest.mark.parametrize("name", ["ordb-hard", "ordb-quadruplet", "ordb-le"])
def test_every_objective_trains(name, ordb, tiny_mlm, engine_ready, tmp_path):
    suite, splits, corpus = ordb
    task = suite.task(name)
    small = {"train": splits["train"][:96], "dev": splits["dev"][:32], "test": splits["test"][:32]}
    out = job(task, small, corpus, tiny_mlm, tmp_path / "job", epochs=1, lr=1e-3, batch_size=32, patience=0)
    assert out["stopped"] == "done" and out["steps"] == 3
    assert np.isfinite(out["dev_loss"]) and out["dev_loss"] > 0
    metrics = [json.loads(line) for line in (tmp_path / "job" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert out["retrieval"]["options"]["hard_negatives"] == "bm25"


# About 20 s on 2 cores: finetune (2 seeds) and eval through the real CLI.
def test_eval_reports_bm25_and_the_untrained_encoder(ordb, tiny_mlm, tmp_path):
    suite, splits, corpus = ordb
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d, text in corpus.items():
            f.write(json.dumps({"_id": d, "title": "", "text": text}, ensure_ascii=False) + "\n")
    with open(data / "queries.jsonl", "w", encoding="utf-8") as f:
        for rows in splits.values():
            for e in rows:
                f.write(json.dumps({"_id": e["query_id"], "text": e["query"]}, ensure_ascii=False) + "\n")
    for s, rows in splits.items():
        (data / f"{s}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
            f"{e['query_id']}\t{d}\t{int(g)}\n" for e in rows for d, g in e["relevant"].items()), encoding="utf-8")
    mine = {"name": "mine", "language": "nb", "tasks": [{
        "name": "phrases", "type": "retrieval",
        "source": {"format": "mteb", "corpus": "data/corpus.jsonl", "queries": "data/queries.jsonl",
                   "train": "data/train.tsv", "dev": "data/dev.tsv", "test": "data/test.tsv"},
        "metric": "recall_at_10", "metrics": ["mrr_at_10", "ndcg_at_10"],
        "retrieval": {"hard_negatives": "bm25"},
        "train": {"lr": 3e-3, "batch_size": 32, "epochs": 2, "max_seq_len": 32, "patience": 0}}]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(mine, allow_unicode=True), encoding="utf-8")
    recipe = {"name": "mine", "run_dir": str(tmp_path / "runs"), "data": {"inputs": [str(tmp_path / "suite.yaml")]},
              "finetune": {"suite": str(tmp_path / "suite.yaml"), "models": [{"tiny": str(tiny_mlm)}], "seeds": 2,
                           "keep_models": True},
              "eval": {"baselines": ["tfidf"], "n_boot": 200, "measure_speed": False}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-m", "kompakt.cli", "eval", str(tmp_path / "recipe.yaml")], cwd=tmp_path,
                       capture_output=True, text=True, env={**env, "KOMPAKT_WATCH_PARENT": "0"}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (ev,) = (tmp_path / "runs").glob("eval-*")
    res = json.loads((ev / "results.json").read_text())["tasks"]["phrases"]
    tiny = res["models"]["tiny"]
    assert len(tiny["scores"]) == 2 and set(tiny["metrics"]) >= {"recall_at_1", "mrr_at_10", "ndcg_at_10"}
    assert "bm25" in res["baselines"] and "tfidf" not in res["baselines"]
    assert res["untrained"]["tiny"]["interval"]["mean"] < tiny["interval"]["mean"]
    assert res["retrieval"]["tiny"]["queries_per_s"] > 0
    pair = next(p for p in res["pairs"] if p["a"] == "tiny" and p["b"] == "bm25")
    md = (ev / "report.md").read_text()
    ahead = "above" if tiny["interval"]["mean"] > res["baselines"]["bm25"]["interval"]["mean"] else "below"
    assert f"{ahead} BM25" in md and "untrained" in md, md[-2000:]
    assert "p_value" in pair or "p" in pair
    (ft,) = (tmp_path / "runs").glob("finetune-*")
    card = (ft / "models" / "phrases" / "tiny" / "README.md").read_text()
    assert "SentenceTransformer" in card
    assert (ft / "models" / "phrases" / "tiny" / "modules.json").is_file()
