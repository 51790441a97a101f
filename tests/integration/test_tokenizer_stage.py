"""The tokenizer stage end to end: `kompakt tokenizer RECIPE` runs data_prep, trains, reports and shards."""

import json

import pyarrow.parquet as pq
import yaml

from kompakt.cli import main
from kompakt.runs import read_manifest
from kompakt.shards import TokenShards


def _recipe(tmp_path, demo_docs, **tokenizer):
    src = tmp_path / "demo.txt"
    src.write_text("\n\n".join(demo_docs[:500]) + "\n", encoding="utf-8")
    recipe = {
        "name": "tok-test",
        "run_dir": str(tmp_path / "runs"),
        "data": {"inputs": [str(src)], "languages": ["nb"], "langid_threshold": 0.3, "min_words": 4},
        "tokenizer": {"kind": "wordpiece", "family": "albert", "vocab_size": 1500, "heldout_fraction": 0.05,
                      "docs_per_shard": 150, "num_proc": 2, **tokenizer},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def test_cli_tokenizer_stage(tmp_path, demo_docs, capsys):
    from transformers import AutoTokenizer

    recipe = _recipe(tmp_path, demo_docs)
    assert main(["tokenizer", str(recipe)]) == 0
    [out] = sorted((tmp_path / "runs").glob("tokenizer-*"))
    manifest = read_manifest(out)
    assert manifest["complete"] is True
    [corpus] = sorted((tmp_path / "runs").glob("prepare-*"))
    num_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (corpus / "corpus").glob("*.parquet"))

    shards, heldout = TokenShards(out / "tokens"), TokenShards(out / "heldout")
    counts = manifest["counts"]
    assert shards.num_docs == counts["num_docs"] and heldout.num_docs == counts["num_heldout_docs"] > 0
    assert shards.num_docs + heldout.num_docs == num_rows > 300
    assert shards.num_tokens == counts["num_tokens"] and heldout.num_tokens == counts["num_heldout_tokens"]
    assert len(shards.shards) == len(heldout.shards) == -(-num_rows // 150)
    report = json.loads((out / "report.json").read_text())
    assert report["vocab_size"] == 1536 and report["heldout"]["unk_rate"] < 0.01

    hf = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert hf.pad_token == "<pad>" and hf.pad_token_id == 0 and len(hf) == 1536
    ids = hf("Blåbærsyltetøy på Ærø")["input_ids"]
    assert hf.decode(ids, skip_special_tokens=True) == "Blåbærsyltetøy på Ærø"

    # A second run finds the complete stage and skips it; a changed setting gives a new directory.
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert main(["tokenizer", str(recipe)]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    assert main(["tokenizer", str(recipe), "tokenizer.kind=bpe"]) == 0
    assert len(list((tmp_path / "runs").glob("tokenizer-*"))) == 2


def test_cli_bad_tokenizer_key_is_one_line(tmp_path, demo_docs, capsys):
    recipe = _recipe(tmp_path, demo_docs)
    assert main(["tokenizer", str(recipe), "tokenizer.vocab_sise=100"]) == 2
    err = capsys.readouterr().err
    assert "did you mean tokenizer.vocab_size" in err and "Traceback" not in err
