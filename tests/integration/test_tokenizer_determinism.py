"""The same corpus and config give the same tokenizer.json bytes and token shards in every process.

`tokenizers`' trainers iterate hash maps whose seed is random per process, so each test trains in
two fresh Python processes that differ in everything that could leak in: PYTHONHASHSEED, the Rust
thread pool (on with 2 threads, or off) and num_proc (1 or 2). Before the fix, two trainings of
these 1,200 demo documents gave WordPiece vocabularies with hundreds of tokens at other ids (447
at vocab 1,000, 310 at 2,000) and Unigram scores with over 30 pieces in another order; byte-level
BPE was already deterministic.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kompakt.tokenization.corpus import write_corpus

KINDS = {"wordpiece": "bert", "unigram": "albert", "bpe": "spanbert"}

# Training and pre-tokenisation only (no transformers import): a few seconds per process.
_TRAIN = """
import sys
from pathlib import Path
from kompakt.config import TokenizerConfig
from kompakt.tokenization.corpus import corpus_files, iter_texts
from kompakt.tokenization.pretokenize import pretokenize
from kompakt.tokenization.train import train_tokenizer

corpus, out, kind, family, num_proc = sys.argv[1:]
cfg = TokenizerConfig(kind=kind, family=family, vocab_size=1000)
files = corpus_files(Path(corpus))
tok = train_tokenizer(cfg, list(iter_texts(files, 0.0, heldout=False)))
Path(out).mkdir(parents=True)
Path(out, "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
pretokenize(tok, files, Path(out) / "tokens", docs_per_shard=300, num_proc=int(num_proc))
print(out)
"""

# The whole stage body: the saved Hugging Face folder, the report, the training and held-out shards.
_STAGE = """
import json, sys
from pathlib import Path
from kompakt.config import TokenizerConfig
from kompakt.runs import open_stage
from kompakt.tokenization import stage

corpus, out, kind, family, num_proc = sys.argv[1:]
cfg = TokenizerConfig(kind=kind, family=family, vocab_size=2000, heldout_fraction=0.05, docs_per_shard=500,
                      num_proc=int(num_proc))
with open_stage(Path(out), "tokenizer", cfg.model_dump(mode="json"), {"corpus": "test"}) as run:
    stage.run(cfg, Path(corpus), run)
print(run.final_dir)
"""


@pytest.fixture(scope="module")
def corpus(demo_docs, tmp_path_factory):
    return write_corpus(demo_docs[:1200], tmp_path_factory.mktemp("corpus"), docs_per_file=400)


def _moved_ids(tok_a: bytes, tok_b: bytes) -> list[str]:
    """Tokens whose id differs between two tokenizer.json files (or that only one has)."""
    va, vb = (json.loads(t)["model"]["vocab"] for t in (tok_a, tok_b))
    va, vb = (v if isinstance(v, dict) else {p: i for i, (p, _) in enumerate(v)} for v in (va, vb))
    return sorted(t for t in va.keys() | vb.keys() if va.get(t) != vb.get(t))


def _run(script: str, corpus: Path, out: Path, kind: str, seed: int, rust_threads: int, num_proc: int) -> Path:
    env = dict(os.environ, PYTHONHASHSEED=str(seed), RAYON_NUM_THREADS=str(max(rust_threads, 1)),
               TOKENIZERS_PARALLELISM="true" if rust_threads > 1 else "false")
    proc = subprocess.run([sys.executable, "-c", script, str(corpus), str(out), kind, KINDS[kind], str(num_proc)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("kind", list(KINDS))
def test_two_processes_train_the_same_tokenizer_and_shards(kind, corpus, tmp_path):
    a = _run(_TRAIN, corpus, tmp_path / "a", kind, seed=1, rust_threads=1, num_proc=1)
    b = _run(_TRAIN, corpus, tmp_path / "b", kind, seed=2, rust_threads=2, num_proc=2)
    tok_a, tok_b = (a / "tokenizer.json").read_bytes(), (b / "tokenizer.json").read_bytes()
    if tok_a != tok_b:
        moved = _moved_ids(tok_a, tok_b)
        pytest.fail(f"{kind}: tokenizer.json differs; {len(moved)} tokens changed id, e.g. {moved[:8]}")
    assert _digests(a / "tokens") == _digests(b / "tokens")


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_two_processes_run_the_same_stage(kind, corpus, tmp_path):
    a = _run(_STAGE, corpus, tmp_path / "a", kind, seed=1, rust_threads=1, num_proc=1)
    b = _run(_STAGE, corpus, tmp_path / "b", kind, seed=2, rust_threads=2, num_proc=2)
    tok_a = (a / "tokenizer" / "tokenizer.json").read_bytes()
    tok_b = (b / "tokenizer" / "tokenizer.json").read_bytes()
    if tok_a != tok_b:
        moved = _moved_ids(tok_a, tok_b)
        pytest.fail(f"{kind}: tokenizer.json differs; {len(moved)} tokens changed id, e.g. {moved[:8]}")
    for sub in ("tokens", "heldout"):
        if (a / sub).exists() or (b / sub).exists():
            assert _digests(a / sub) == _digests(b / sub), sub
    assert json.loads((a / "report.json").read_text()) == json.loads((b / "report.json").read_text())
