"""`kompakt explain` on the conftest's tiny classifier, whose decision rests on one cue word per text.

The toy model is right on every toy text and predicts "negative" unless "fantastisk" is present, so for a
positive text the cue must carry nearly all of the probability difference in both methods, and the SHAP
values must sum to p(text) - p(all words masked) (efficiency).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

KOMPAKT = [sys.executable, "-m", "kompakt.cli"]
POSITIVE = "vi så båten ved sjøen , fantastisk tur med barna"


@pytest.fixture(scope="module")
def predictor(tiny_classifier):
    from kompakt.infer.explain import load_classifier

    return load_classifier(tiny_classifier)


def test_attributions_sum_to_the_difference_and_find_the_cue(predictor):
    from kompakt.infer.explain import explain_texts

    [res] = explain_texts(predictor, [POSITIVE], budget=128, ig_steps=32, seed=0)
    words = [w["text"] for w in res["words"]]
    assert words == POSITIVE.split()
    for w in res["words"]:  # character offsets point into the text
        assert POSITIVE[w["start"]:w["end"]] == w["text"]
    assert res["predicted"]["label"] == "positive" and res["target"] == "positive"
    p_text = res["probabilities"][res["labels"].index("positive")]
    gap = p_text - res["shap"]["base_value"]
    assert gap > 0.5  # the toy model is sure, and unsure with every word masked
    shap_v = np.asarray(res["attributions"]["shap"])
    assert shap_v.sum() == pytest.approx(gap, abs=1e-4)
    ig_v = np.asarray(res["attributions"]["ig"])
    assert abs(res["ig"]["delta"]) <= 0.05 * gap + 1e-6  # steps doubled until converged
    assert abs(ig_v.sum() - gap) <= 0.05 * gap + 1e-4
    cue = words.index("fantastisk")
    for v in (shap_v, ig_v):
        assert int(np.argmax(v)) == cue
        assert v[cue] > 0.8 * gap
    # The budget bounds SHAP's model evaluations, and they run batched (with masks), not one per perturbation.
    assert 0 < res["shap"]["evaluations"] <= 128
    assert res["shap"]["forward_passes"] < res["shap"]["evaluations"] / 4
    assert set(res["stability"]) == {"shap_vs_ig", "shap_seed_vs_seed"}


def test_subwords_group_into_words_and_chinese_uses_the_word_lattice(predictor):
    from kompakt.infer.explain import explain_texts, prepare, split_words

    # A word the 30k English vocabulary splits into several pieces stays one feature.
    prep = prepare(predictor.tokenizer, "sjøbåtenes fantastisk", predictor.max_length)
    assert prep.word_tokens.shape[0] == 2
    assert prep.word_tokens[0].sum() > 1  # several sub-word tokens in the first word
    assert (prep.word_tokens.sum(axis=0) <= 1).all()  # every token belongs to at most one word
    zh = "我们今天去北京大学看书"
    spans = split_words(zh)
    assert "".join(zh[a:b] for a, b in spans) == zh
    assert len(spans) < len(zh)  # words of several characters, not single characters
    [res] = explain_texts(predictor, [zh], methods=("shap",), budget=64, stability=False)
    assert res["segmentation"] == "jieba"
    assert len(res["attributions"]["shap"]) == len(spans)


def test_cli_writes_html_png_and_json_last(tiny_classifier, tmp_path):
    src = tmp_path / "texts.jsonl"
    src.write_text(json.dumps({"body": POSITIVE}) + "\n" + json.dumps({"body": "elendig maten i byen"}) + "\n",
                   encoding="utf-8")
    out = tmp_path / "ex"
    run = subprocess.run([*KOMPAKT, "explain", str(tiny_classifier), "--input", str(src), "--text-field", "body",
                          "--out", str(out), "--budget", "64", "--ig-steps", "16"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    doc = json.loads((out / "explanations.json").read_text(encoding="utf-8"))
    assert [t["text"] for t in doc["texts"]] == [POSITIVE, "elendig maten i byen"]
    assert doc["texts"][1]["predicted"]["label"] == "negative"
    page = (out / "explanations.html").read_text(encoding="utf-8")
    # Words appear in text order, each with its value in a tooltip, with the prediction and a bar chart.
    pos = [page.index(f">{w}<") for w in ("vi", "båten", "sjøen", "fantastisk", "barna")]
    assert pos == sorted(pos)
    assert "positive" in page and "<svg" in page
    for t in doc["texts"]:
        png = (out / t["png"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert not list(out.glob(".*tmp*"))


@pytest.mark.parametrize("case", ["no-head", "no-field", "no-texts"])
def test_bad_input_is_one_line_and_exit_2(case, tiny_bert, tiny_classifier, tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text(json.dumps({"other": "x"}) + "\n", encoding="utf-8")
    args = {"no-head": [str(tiny_bert), "ein tekst"],
            "no-field": [str(tiny_classifier), "--input", str(src)],
            "no-texts": [str(tiny_classifier)]}[case]
    run = subprocess.run([*KOMPAKT, "explain", *args, "--out", str(tmp_path / "o")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert not (tmp_path / "o" / "explanations.json").exists()
