"""`kompakt run` resolves and reports each stage once, and the pretrain stage holds out whole documents."""

from __future__ import annotations

import gzip

import numpy as np
import yaml

from kompakt.cli import main


def _recipe(tmp_path, demo_docs) -> str:
    src = tmp_path / "corpus.txt.gz"
    src.write_bytes(gzip.compress("\n\n".join(demo_docs[:400]).encode("utf-8")))
    recipe = {"name": "once", "run_dir": str(tmp_path / "runs"),
              "data": {"inputs": [str(src)], "min_words": 3, "dedup": {"near": False}},
              "tokenizer": {"kind": "wordpiece", "family": "bert", "vocab_size": 512, "heldout_fraction": 0.05}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


def test_each_stage_is_reported_once(tmp_path, demo_docs, capfd):
    recipe = _recipe(tmp_path, demo_docs)
    assert main(["run", recipe]) == 0
    capfd.readouterr()
    assert main(["run", recipe]) == 0
    err = capfd.readouterr().err
    assert err.count("prepare: complete, skipped") == 1, err
    assert err.count("tokenizer: complete, skipped") == 1, err
    assert main(["tokenizer", recipe]) == 0
    err = capfd.readouterr().err
    assert err.count("prepare: complete, skipped") == 1 and err.count("tokenizer: complete, skipped") == 1, err


def test_heldout_by_document_keeps_every_example_of_a_held_document_out(tmp_path, demo_docs):
    from test_pretrain import build_tokenizer_stage

    from kompakt.pretrain.data import build_examples
    from kompakt.pretrain.stage import heldout_by_document
    from kompakt.shards import TokenShards

    tok = build_tokenizer_stage(tmp_path / "tok", demo_docs[:800], vocab_size=512)
    shards = TokenShards(tok / "tokens")
    examples = build_examples(shards, 30, 1)  # short examples: long documents give several
    train, held = heldout_by_document(shards, examples)
    assert len(train) + len(held) == len(examples) and len(held) > 0

    def docs(ex):
        offsets = shards.shards[0].doc_offsets
        return set((np.searchsorted(offsets, ex.start, side="right") - 1).tolist())

    assert not docs(train) & docs(held), "a held-out document also gave training examples"
    assert len(held) > len(docs(held))  # some held-out documents span several examples, all of them held out
