"""lingua separates Bokmål, Nynorsk and English on real sentences; unknown codes fail at start-up."""

import pytest

from kompakt.config import DataConfig
from kompakt.data_prep import langid
from kompakt.errors import ConfigError

BOKMAL = [
    "Regjeringen har bestemt at skolene skal holde stengt resten av uken på grunn av uværet.",
    "Jeg har ikke hørt fra henne siden hun flyttet til Bergen for to år siden.",
    "Kommunen ønsker å bygge flere boliger for unge som ikke har råd til å kjøpe sin første leilighet.",
    "Det er viktig at vi snakker sammen om hvordan vi skal løse disse problemene.",
]
NYNORSK = [
    "Regjeringa har bestemt at skulane skal halde stengt resten av veka på grunn av uvêret.",
    "Eg har ikkje høyrt frå henne sidan ho flytte til Bergen for to år sidan.",
    "Kommunen ønskjer å byggje fleire bustader for unge som ikkje har råd til å kjøpe sitt første husvære.",
    "Det er viktig at vi snakkar saman om korleis vi skal løyse desse problema.",
]
ENGLISH = [
    "The government has decided that the schools will stay closed for the rest of the week.",
    "I have not heard from her since she moved to Bergen two years ago.",
]


@pytest.fixture(scope="module")
def detector():
    return langid.get_detector(langid.candidates(["nb", "nn"]), "high")


def test_bokmal_nynorsk_english_are_told_apart(detector):
    for expected, sentences in (("nb", BOKMAL), ("nn", NYNORSK), ("en", ENGLISH)):
        for s in sentences:
            label, score, top = langid.detect(detector, s, frozenset())
            assert (label, top) == (expected, expected), s
            assert score > 0.5, s


def test_kept_languages_pool_their_confidence(detector):
    # Keeping only nb, a Nynorsk sentence is labelled nb but scores low; keeping both, it scores high.
    label_nb, score_nb, top = langid.detect(detector, NYNORSK[1], frozenset({"nb"}))
    label_no, score_no, _ = langid.detect(detector, NYNORSK[1], frozenset({"nb", "nn"}))
    assert top == "nn" and label_nb == "nb" and score_nb < 0.5
    assert label_no == "nn" and score_no > 0.9
    assert langid.detect(detector, ENGLISH[0], frozenset({"nb", "nn"}))[1] < 0.1


def test_no_letters_is_unknown(detector):
    assert langid.detect(detector, "12 345 - 678", frozenset({"nb"}))[:2] == (langid.UNKNOWN, 0.0)


def test_candidates_include_confusers_and_recipe_languages():
    cands = langid.candidates(["zh", "nb"])
    assert {"nb", "nn", "da", "sv", "en", "de", "zh"} <= set(cands)
    assert cands == langid.candidates(["nb", "zh"])  # one cached detector per set


@pytest.mark.parametrize("code", ["xx", "nor", "no"])
def test_unknown_language_code_is_a_config_error(code):
    with pytest.raises(ConfigError, match="data.languages"):
        DataConfig(inputs=["x"], languages=[code])
