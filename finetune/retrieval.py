"""Retrieval: a bi-encoder (one shared encoder for queries and documents, mean or [CLS] pooling) trained on
a task's queries and corpus, searched with faiss, exported as a sentence-transformers folder.

The objectives, each an option of the task's `retrieval:` section (kompakt.finetune.tasks.RetrievalOptions):

- in-batch negatives (InfoNCE, the baseline): query i against every document of the batch, its own
  positive the target; `temperature` (0.05) over cosine scores. Documents of the batch that are relevant
  to query i but are not its target (two queries of one article) are masked out, not counted as negatives.
- mined hard negatives (`hard_negatives: bm25 | model`): `num_hard_negatives` per query join the batch's
  documents, drawn from the query's `mine_depth` best-ranked non-relevant documents by BM25 (bm25s) or by
  the encoder as the job starts (faiss). The draw is fixed per query and seed (as DPR fixes one BM25
  negative per question), so a resumed job sees the same batches.
- QuadrupletBERT's quadruplet loss (`loss: quadruplet`; Liu et al., NAACL 2021): with s the cosine score
  of the query against its positive p, a hard negative h and a simple negative e (a random document),
  `relu(margin - s_p + s_h) + relu(margin_easy - s_h + s_e)`: the positive above the hard negative and,
  the paper's addition, the hard negative above the simple one, so the space keeps a graded order instead
  of pushing every negative equally far.
- label enhancement (`label_enhancement: w`): the InfoNCE target is `(1 - w) * one-hot + w * softmax(r /
  le_temperature)` over the batch's documents, where the relevance r of a query-document pair mixes term
  weighting and context: `le_alpha * bm25 / max bm25 of the query's row + (1 - le_alpha) * cosine` of the
  encoder as the job started. A hard negative that shares many terms and much meaning with the query is
  then not pushed as far as an unrelated document (graded relevance instead of 0-1 labels).

Evaluation embeds the whole corpus (documents up to `max_doc_len` tokens), builds a faiss index (`flat`
inner product below 100,000 documents with `index: auto`, HNSW above; `ivf` on request) and retrieves
`top_k` documents per query; the predictions are ranked document ids, scored by kompakt.eval.metrics
(recall@k, MRR@10, nDCG@10). The job also records the encoder as it started (its dev and test rankings,
the untrained baseline), the index build time and queries per second.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from kompakt.log import info
from kompakt.train_config import RunControl

from kompakt.finetune.heads import pad
from kompakt.finetune.loader import BucketLoader, eval_batches

# Han characters are terms on their own (Chinese has no spaces); otherwise runs of letters and digits,
# lowercased, so "Ørret," and "ørret" are one term.
_TERM = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+")
# index: auto uses exact search up to this many documents (a flat inner-product search of 100,000 x 312
# floats takes about 10 ms a query on 2 cores), HNSW above.
FLAT_MAX_DOCS = 100_000
HNSW_M = 32
EMBED_BATCH_TOKENS = 8192


def terms(text: str) -> list[str]:
    """The BM25 terms of a text: lowercased words, single Han characters."""
    return _TERM.findall(text.lower())


class BM25:
    """Okapi BM25 (bm25s, k1 1.5, b 0.75) over a corpus given as {doc id: text}."""

    def __init__(self, corpus: dict[str, str]):
        import bm25s

        self.ids = list(corpus)
        self.index = {d: i for i, d in enumerate(self.ids)}
        self.model = bm25s.BM25()
        self.model.index([terms(corpus[d]) or ["\x00"] for d in self.ids], show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """(num_docs,) float32 BM25 score of every document for `query`, in corpus order."""
        q = terms(query)
        if not q:
            return np.zeros(len(self.ids), dtype=np.float32)
        return np.asarray(self.model.get_scores(q), dtype=np.float32)

    def search(self, queries: list[str], k: int) -> list[list[str]]:
        """The k best documents of each query, best first (ties in corpus order)."""
        k = min(k, len(self.ids))
        out = []
        for q in queries:
            s = self.scores(q)
            top = np.argsort(-s, kind="stable")[:k]
            out.append([self.ids[i] for i in top])
        return out


# ------------------------------------------------------------------------------------------------ losses

def info_nce(q: torch.Tensor, d: torch.Tensor, target: torch.Tensor, temperature: float,
             exclude: torch.Tensor | None = None, soft: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of softmax(q @ d.T / temperature) over the documents d (N, H) for queries q (B, H):
    against the index `target` (B,), or against the distribution `soft` (B, N) when given. `exclude` (B, N,
    bool) drops documents from a query's softmax (relevant ones that are not its target)."""
    logits = (q @ d.T).float() / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    if soft is None:
        return torch.nn.functional.nll_loss(logp, target)
    if exclude is not None:
        logp = logp.masked_fill(exclude, 0.0)  # soft is 0 there; -inf * 0 would be NaN
    return -(soft * logp).sum(-1).mean()


def quadruplet_loss(q: torch.Tensor, pos: torch.Tensor, hard: torch.Tensor, easy: torch.Tensor, margin: float,
                    margin_easy: float) -> torch.Tensor:
    """QuadrupletBERT's loss over rows of (query, positive, hard negative, simple negative) embeddings (B, H):
    mean of relu(margin - s_p + s_h) + relu(margin_easy - s_h + s_e), s the row-wise dot product (cosine for
    normalised embeddings)."""
    s_p, s_h, s_e = ((q * x).sum(-1).float() for x in (pos, hard, easy))
    return (torch.relu(margin - s_p + s_h) + torch.relu(margin_easy - s_h + s_e)).mean()


def relevance(bm25: torch.Tensor, cosine: torch.Tensor, alpha: float) -> torch.Tensor:
    """Graded relevance (B, N) of label enhancement: alpha * BM25 scaled by each row's maximum (into [0, 1];
    a row without any matching term is 0) + (1 - alpha) * cosine."""
    top = bm25.max(dim=-1, keepdim=True).values
    scaled = torch.where(top > 0, bm25 / top.clamp_min(1e-12), torch.zeros_like(bm25))
    return alpha * scaled + (1 - alpha) * cosine


def enhanced_targets(target: torch.Tensor, rel: torch.Tensor, weight: float, temperature: float,
                     exclude: torch.Tensor | None = None) -> torch.Tensor:
    """(1 - weight) * one-hot(target) + weight * softmax(rel / temperature) over the batch's documents (B, N);
    excluded documents get 0."""
    logits = rel.float() / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    one_hot = torch.nn.functional.one_hot(target, rel.shape[-1]).float()
    return (1 - weight) * one_hot + weight * torch.softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------- encoder

def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, H) sentence embeddings of (B, L, H) hidden states: [CLS] or the mean over real tokens (the
    special tokens included, as sentence-transformers' mean pooling does)."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class BiEncoder(torch.nn.Module):
    """One encoder for queries and documents; forward gives (query, document) embeddings."""

    def __init__(self, encoder: torch.nn.Module, pooling: str, normalize: bool):
        super().__init__()
        self.encoder, self.pooling, self.normalize = encoder, pooling, normalize

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        e = pool(out.last_hidden_state, attention_mask, self.pooling)
        return torch.nn.functional.normalize(e.float(), dim=-1) if self.normalize else e.float()

    def forward(self, input_ids, attention_mask, doc_input_ids, doc_attention_mask, **_):
        return self.embed(input_ids, attention_mask), self.embed(doc_input_ids, doc_attention_mask)


@torch.no_grad()
def embed_texts(model: BiEncoder, rows: list[list[int]], pad_id: int, device, batch_tokens: int = EMBED_BATCH_TOKENS
                ) -> np.ndarray:
    """(N, H) float32 embeddings of token-id rows, in their order; batches of similar length."""
    model.eval()
    if not rows:
        return np.zeros((0, 1), dtype=np.float32)
    lengths = np.array([len(r) for r in rows])
    order = np.argsort(lengths, kind="stable")
    out: list[np.ndarray | None] = [None] * len(rows)
    i = 0
    while i < len(order):  # rows sorted by length: a batch is as wide as its last row
        j = i + 1
        while j < len(order) and (j - i + 1) * lengths[order[j]] <= batch_tokens:
            j += 1
        ids = order[i:j]
        x, mask = pad([rows[k] for k in ids], pad_id)
        e = model.embed(x.to(device), mask.to(device)).cpu().numpy()
        for k, row in zip(ids, e):
            out[k] = row
        i = j
    return np.stack(out).astype(np.float32)


# ----------------------------------------------------------------------------------------------- search

def build_index(emb: np.ndarray, kind: str = "auto"):
    """A faiss inner-product index over (N, H) embeddings: flat (exact), HNSW (M 32, efSearch 128) or IVF
    (4 sqrt(N) lists, nprobe a tenth of them)."""
    import faiss

    n, dim = emb.shape
    if kind == "auto":
        kind = "flat" if n <= FLAT_MAX_DOCS else "hnsw"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))  # faiss wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(emb)
        index.nprobe = max(1, nlist // 10)
    index.add(emb)
    return index, kind


def search(index, queries: np.ndarray, doc_ids: list[str], k: int) -> list[list[str]]:
    """The k best document ids per query row, best first."""
    k = min(k, len(doc_ids))
    _, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return [[doc_ids[i] for i in row if i >= 0] for row in idx]


# ------------------------------------------------------------------------------------------------ batches

def _draw(key: str, n: int) -> int:
    """A fixed pseudo-random index in [0, n) for `key` (the same on every machine and resume)."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") % n


class Batcher:
    """Turns query features into batches: the queries, the batch's documents (each query's positive, its
    hard negatives, its simple negative for the quadruplet loss), the target columns and the exclusion mask;
    with label enhancement the soft target too."""

    def __init__(self, opts, doc_tokens: dict[str, list[int]], doc_ids: list[str], pad_id: int, seed: int,
                 bm25: BM25 | None = None, start_queries: np.ndarray | None = None,
                 start_docs: np.ndarray | None = None):
        self.opts, self.doc_tokens, self.doc_ids = opts, doc_tokens, doc_ids
        self.doc_index = {d: i for i, d in enumerate(doc_ids)}
        self.pad_id, self.seed, self.bm25 = pad_id, seed, bm25
        self.start_queries, self.start_docs = start_queries, start_docs

    def __call__(self, features: list[dict]) -> dict:
        o = self.opts
        b = len(features)
        docs = [f["positive"] for f in features]
        k = o.num_hard_negatives if o.hard_negatives != "none" else 0
        for f in features:
            mined = f["mined"]
            for j in range(k):
                docs.append(mined[_draw(f"{self.seed}/{f['query_id']}/hard{j}", len(mined))] if mined
                            else self._random_doc(f, f"hard{j}"))
        if o.loss == "quadruplet":
            docs += [self._random_doc(f, "easy") for f in features]
        q_ids, q_mask = pad([f["input_ids"] for f in features], self.pad_id)
        d_ids, d_mask = pad([self.doc_tokens[d] for d in docs], self.pad_id)
        exclude = torch.tensor([[d in f["relevant"] and j != i for j, d in enumerate(docs)]
                                for i, f in enumerate(features)], dtype=torch.bool)
        batch = {"input_ids": q_ids, "attention_mask": q_mask, "doc_input_ids": d_ids, "doc_attention_mask": d_mask,
                 "target": torch.arange(b), "exclude": exclude}
        if o.loss == "quadruplet":
            batch["hard_index"] = torch.arange(b) * k + b  # each query's first hard negative
            batch["easy_index"] = torch.arange(b) + b + b * k
        if o.label_enhancement > 0:
            cols = [self.doc_index[d] for d in docs]
            bm = torch.from_numpy(np.stack([self.bm25.scores(f["query"])[cols] for f in features]))
            cos = torch.from_numpy(self.start_queries[[f["row"] for f in features]] @ self.start_docs[cols].T)
            batch["soft"] = enhanced_targets(batch["target"], relevance(bm, cos, o.le_alpha), o.label_enhancement,
                                             o.le_temperature, exclude)
        return batch

    def _random_doc(self, f: dict, what: str) -> str:
        """A document not relevant to the query (a simple negative), fixed per query, seed and `what`."""
        for attempt in range(100):
            d = self.doc_ids[_draw(f"{self.seed}/{f['query_id']}/{what}/{attempt}", len(self.doc_ids))]
            if d not in f["relevant"]:
                return d
        return self.doc_ids[0]


def loss_of(opts, q: torch.Tensor, d: torch.Tensor, batch: dict) -> torch.Tensor:
    """The task's objective on one batch's query and document embeddings."""
    if opts.loss == "quadruplet":
        return quadruplet_loss(q, d[batch["target"]], d[batch["hard_index"]], d[batch["easy_index"]], opts.margin,
                               opts.margin_easy)
    return info_nce(q, d, batch["target"], opts.temperature, batch["exclude"], batch.get("soft"))


# --------------------------------------------------------------------------------------------------- a job

class _EncoderHead:
    """The task-type face train.load_model reads: the stock AutoModel (with BERT's pooler, unused since the
    pooling is ours, so the exported folder loads with stock AutoModel without a "newly initialised" report)."""

    auto_class = "AutoModel"

    @staticmethod
    def head_kwargs(labels: list[str]) -> dict:
        return {}


def load_encoder(model_dir: Path):
    """(tokenizer, AutoModel) of a model folder; the vocabularies must agree (train.load_model)."""
    from kompakt.finetune.train import load_model

    return load_model(model_dir, _EncoderHead, [])


def _tokens(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_len, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"] if texts else []


def rank(model: BiEncoder, query_rows: dict[str, list[list[int]]], doc_rows: list[list[int]], doc_ids: list[str],
         pad_id: int, device, opts) -> tuple[dict[str, list[list[str]]], dict, np.ndarray, dict[str, np.ndarray]]:
    """Rankings (top_k doc ids per query) of each split's queries over the whole corpus, the figures (index
    kind, corpus embedding and index build seconds, search and end-to-end queries/s), the corpus embeddings
    and each split's query embeddings."""
    t0 = time.perf_counter()
    docs = embed_texts(model, doc_rows, pad_id, device)
    t1 = time.perf_counter()
    index, kind = build_index(docs, opts.index)
    t2 = time.perf_counter()
    out, queries, n_q, t_embed, t_search = {}, {}, 0, 0.0, 0.0
    for split, rows in query_rows.items():
        a = time.perf_counter()
        q = queries[split] = embed_texts(model, rows, pad_id, device)
        b = time.perf_counter()
        out[split] = search(index, q, doc_ids, opts.top_k)
        c = time.perf_counter()
        n_q, t_embed, t_search = n_q + len(rows), t_embed + b - a, t_search + c - b
    figures = {"index": kind, "num_docs": len(doc_ids), "corpus_embed_s": round(t1 - t0, 3),
               "index_build_s": round(t2 - t1, 4), "num_queries": n_q,
               "search_queries_per_s": round(n_q / max(t_search, 1e-9), 1),
               "queries_per_s": round(n_q / max(t_embed + t_search, 1e-9), 1)}
    return out, figures, docs, queries


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (cosine similarity as a dot product)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def features_of(examples: list[dict], rows: list[list[int]], mined: dict[str, list[str]]) -> list[dict]:
    """One training feature per (query, relevant document) pair, the most relevant first."""
    feats = []
    for r, (ex, ids) in enumerate(zip(examples, rows)):
        for doc in sorted(ex["relevant"], key=lambda d: -ex["relevant"][d]):
            feats.append({"input_ids": ids, "query_id": ex["query_id"], "query": ex["query"], "row": r,
                          "positive": doc, "relevant": set(ex["relevant"]), "mined": mined.get(ex["query_id"], [])})
    return feats


def mine(examples: list[dict], ranked: list[list[str]], depth: int) -> dict[str, list[str]]:
    """query id -> its `depth` best-ranked documents that are not relevant to it."""
    return {ex["query_id"]: [d for d in r if d not in ex["relevant"]][:depth] for ex, r in zip(examples, ranked)}


def run_retrieval_job(model_dir: Path, task, splits: dict[str, list[dict]], corpus: dict[str, str], *, seed: int,
                      work_dir: Path, engine_cfg, run_cfg: RunControl, stop, keep_dir: Path | None = None) -> dict:
    """Fine-tune a bi-encoder on the task's training queries, early-stop on the dev loss, rank dev and test
    queries over the corpus; returns predictions (ranked doc ids) and figures, as run_job does."""
    from kompakt import checkpoint, dist
    from kompakt.engine import choose_device
    from kompakt.errors import DataError

    from kompakt.st_folder import save_embedding_model

    from kompakt.finetune.train import train_early_stopping

    t0 = time.perf_counter()
    opts, cfg = task.retrieval, task.train
    if not corpus:
        raise DataError(f"task {task.name}: the retrieval corpus is empty; give source.corpus documents")
    checkpoint.seed_everything(seed)
    tokenizer, encoder = load_encoder(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = BiEncoder(encoder, opts.pooling, opts.normalize)
    # Documents and queries are cut to the model's positions too (a 128-position model with max_doc_len 256).
    positions = int(getattr(encoder.config, "max_position_embeddings", 0) or 10**9)
    doc_len, q_len = min(opts.max_doc_len, positions), min(cfg.max_seq_len, positions)
    doc_ids = list(corpus)
    doc_rows = _tokens(tokenizer, [corpus[d] for d in doc_ids], doc_len)
    doc_tokens = dict(zip(doc_ids, doc_rows))
    q_rows = {s: _tokens(tokenizer, [e["query"] for e in splits[s]], q_len) for s in ("train", "dev", "test")}
    device = choose_device(dist.setup_env())
    model.to(device)

    # The encoder as the job starts: the untrained baseline's rankings (dev, test), and, when model-mined
    # negatives or label enhancement need them, the train queries' embeddings, all from one pass.
    need_start_train = opts.label_enhancement > 0 or opts.hard_negatives == "model"
    start_splits = ("train", "dev", "test") if need_start_train else ("dev", "test")
    start_rank, start_figures, start_docs, start_q = rank(model, {s: q_rows[s] for s in start_splits}, doc_rows,
                                                          doc_ids, pad_id, device, opts)
    start_unit = unit(start_docs)
    start_q = {s: unit(start_q[s]) if s in start_q else None for s in ("train", "dev")}
    bm25 = BM25(corpus) if opts.hard_negatives == "bm25" or opts.label_enhancement > 0 else None
    mined: dict[str, dict[str, list[str]]] = {"train": {}, "dev": {}}
    if opts.hard_negatives != "none":
        depth = opts.mine_depth + max(len(e["relevant"]) for s in ("train", "dev") for e in splits[s])
        flat = build_index(start_unit, "flat")[0] if opts.hard_negatives == "model" else None
        for s in ("train", "dev"):
            ranked = (bm25.search([e["query"] for e in splits[s]], depth) if opts.hard_negatives == "bm25"
                      else search(flat, start_q[s], doc_ids, depth))
            mined[s] = mine(splits[s], ranked, opts.mine_depth)
    model.train()
    train_feats = features_of(splits["train"], q_rows["train"], mined["train"])
    dev_feats = features_of(splits["dev"], q_rows["dev"], mined["dev"])
    # Label enhancement's cosine: the start encoder's, each split's queries against the corpus.
    batcher = Batcher(opts, doc_tokens, doc_ids, pad_id, seed, bm25, start_q["train"], start_unit)
    dev_batcher = Batcher(opts, doc_tokens, doc_ids, pad_id, seed, bm25, start_q["dev"], start_unit)
    loader = BucketLoader(train_feats, batcher, cfg.batch_size, seed)
    dev_batches = [dev_batcher([dev_feats[i] for i in ids])
                   for ids in eval_batches(np.array([len(f["input_ids"]) for f in dev_feats]), cfg.batch_size)]

    def step_fn(m, batch, teacher):
        q, d = m(**batch)
        return {"loss": loss_of(opts, q, d, batch), "num_predictions": int(q.shape[0])}

    fit = train_early_stopping(model, loader, dev_batches, step_fn, cfg, engine_cfg=engine_cfg, run_cfg=run_cfg,
                               seed=seed, work_dir=work_dir, stop=stop, name=f"{task.name} s{seed}",
                               extra={"task": task.name, "model_dir": str(model_dir), "seed": seed})
    if fit["stopped"] != "done":
        return {"stopped": fit["stopped"], "step": fit["step"]}
    final = fit["model"]
    ranked, figures, _, _ = rank(final, {"dev": q_rows["dev"], "test": q_rows["test"]}, doc_rows, doc_ids, pad_id,
                              fit["device"], opts)
    if keep_dir is not None:
        save_embedding_model(copy.deepcopy(final.encoder).cpu(), tokenizer, keep_dir, pooling=opts.pooling,
                             normalize=opts.normalize, max_seq_length=doc_len)
    info(f"finetune: {task.name} seed {seed}: {fit['steps']} steps of {fit['max_steps']}, best dev loss "
         f"{fit['dev_loss']:.4f} at step {fit['best_step']}; {figures['num_docs']:,} documents ({figures['index']} "
         f"index), {figures['queries_per_s']:,.0f} queries/s")
    return {"stopped": "done", **fit["figures"], "predictions": ranked,
            "untrained_predictions": {s: start_rank[s] for s in ("dev", "test")},
            "retrieval": {**figures, "untrained": start_figures,
                          "options": opts.model_dump(mode="json")},
            "train_examples": len(splits["train"]), "seconds": round(time.perf_counter() - t0, 2)}
