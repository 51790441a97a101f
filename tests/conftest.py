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


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
