"""`kompakt bench model` is registered and, in its quick form, returns the documented figures."""

import pytest

from kompakt.cli import BENCHES, build_parser


def test_model_bench_is_registered():
    assert "model" in BENCHES
    args = build_parser().parse_args(["bench", "model", "--quick", "--json"])
    assert args.what == "model" and args.quick and args.json


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_quick_model_bench_figures(family):
    from kompakt.bench import run

    result = run("model", recipe="recipes/demo-nb.yaml", quick=True, family=family)
    assert result["family"] == family
    for key in ("tokens_per_s", "tokens_per_s_padded", "tokens_per_s_concat", "ratio", "ratio_concat", "device"):
        assert key in result
    # Packed documents against padded ones: the padded baseline wastes 40%+ of its slots on padding.
    assert result["padding_fraction"] > 0.3 and result["ratio"] > 1.0
    assert result["ratio"] == pytest.approx(result["tokens_per_s"] / result["tokens_per_s_padded"])
