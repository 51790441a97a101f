"""Normalisation keeps Norwegian letters and Chinese punctuation; the filters' measures on real text."""

import pytest

from kompakt.config import DataConfig
from kompakt.data_prep.normalize import alpha_ratio, normalize_text, repeated_line_ratio, words
from kompakt.data_prep.stage import PART_STEPS, process_chunk


@pytest.mark.parametrize("form", ["NFKC", "NFC"])
def test_keeps_norwegian_letters_and_umlauts(form):
    text = "Blåbærsyltetøy på brødskiva. Æsj, sa Øystein. Müller kjørte til Tromsø."
    assert normalize_text(text, form) == text


def test_nfkc_keeps_chinese_fullwidth_punctuation_but_folds_fullwidth_letters():
    text = "你好，世界！你吃饭了吗？我们走吧：好的；（真的）……。Ａ１"
    out = normalize_text(text, "NFKC")
    for ch in "，！？：；（）…。":
        assert ch in out, ch
    assert out.endswith("。A1") and "," not in out and "!" not in out
    # Plain NFKC would have turned them into ASCII: the protection is what keeps them.
    import unicodedata

    assert "，" not in unicodedata.normalize("NFKC", text)


def test_decomposed_accents_are_composed_not_stripped():
    decomposed = "bla\u030abær og mu\u0308sli"  # å and ü as base letter + combining mark
    assert normalize_text(decomposed, "NFKC") == "blåbær og müsli"
    assert normalize_text(decomposed, "NFC") == "blåbær og müsli"
    assert normalize_text(decomposed, "none") == decomposed


def test_control_characters_and_broken_whitespace():
    raw = ("Det\u00a0var\u200b en\t\tkald   dag\x07 i\u2009Oslo.\r\n  Neste linje \x1b  \n\n\n\n"
           "Siste\u00ad linje.\ufeff")
    assert normalize_text(raw, "NFKC") == "Det var en kald dag i Oslo.\nNeste linje\n\nSiste linje."
    # NFC leaves NBSP alone as a code point, but the whitespace step still turns it into a space.
    assert normalize_text("a\u00a0b", "NFC") == "a b"


def test_lowercase_is_optional():
    assert normalize_text("Ærlig Talt", lowercase=True) == "ærlig talt"
    assert normalize_text("Ærlig Talt") == "Ærlig Talt"


def test_measures():
    assert words("Det er kaldt i dag.") == ["Det", "er", "kaldt", "i", "dag."]
    assert len(words("我们去公园 吧 ok")) == 7  # CJK characters count one word each
    assert alpha_ratio("abc 123") == pytest.approx(0.5)
    assert alpha_ratio("   ") == 0.0
    assert repeated_line_ratio("Les mer\nLes mer\nLes mer\nInnhold") == pytest.approx(0.5)
    assert repeated_line_ratio("én linje") == 0.0


NB_DOC = (
    "Regjeringen har bestemt at skolene skal holde stengt resten av uken på grunn av uværet. "
    "Foreldre blir bedt om å følge med på kommunens nettsider for oppdateringer."
)


def _removed_by(cfg: DataConfig, doc: str) -> str | None:
    """The step that removes `doc`, or None when it is kept."""
    out = process_chunk(cfg, [("d", doc)])
    passed = sum(1 for n in out.docs_out if n)
    return None if passed == len(PART_STEPS) else PART_STEPS[passed]


def test_each_filter_on_real_norwegian_text():
    cfg = DataConfig(
        inputs=["x"],
        languages=["nb", "nn"],
        min_chars=40,
        max_chars=400,
        min_words=8,
        max_words=60,
        min_alpha_ratio=0.6,
        max_repeated_line_ratio=0.3,
    )
    assert _removed_by(cfg, NB_DOC) is None
    assert _removed_by(cfg, "\u200b\x07 \n") == "normalize"
    assert _removed_by(cfg, "Takk for maten.") == "min_chars"
    assert _removed_by(cfg, (NB_DOC + " ") * 4) == "max_chars"
    assert _removed_by(cfg, "Sykkelverkstedarbeidsplassene forsvinner sakte.") == "min_words"
    cfg_words = cfg.model_copy(update={"max_words": 20})
    assert _removed_by(cfg_words, NB_DOC) == "max_words"
    table = "Resultat 2023: 12,5 % 13,7 % 14,1 % 15,0 % 16,2 % 17,9 % 18,3 % 19,8 % 20,4 %"
    assert _removed_by(cfg, table) == "min_alpha_ratio"
    boiler = "Les mer om saken her\nDel artikkelen på Facebook\nLes mer om saken her\nLes mer om saken her"
    assert _removed_by(cfg, boiler) == "max_repeated_line_ratio"
    english = "The government has decided that the schools will stay closed for the rest of the week."
    assert _removed_by(cfg, english) == "language"


def test_chunk_counts_characters_per_step():
    cfg = DataConfig(inputs=["x"], languages=["nb", "nn"], min_chars=40)
    out = process_chunk(cfg, [("a", NB_DOC), ("b", "Takk for maten."), ("c", "  " + NB_DOC + "\x07")])
    assert out.num_docs_in == 3 and out.num_chars_in == len(NB_DOC) * 2 + len("Takk for maten.") + 3
    assert out.docs_out[0] == 3 and out.docs_out[1] == 2 and out.docs_out[-1] == 2
    assert out.chars_out[1] == 2 * len(NB_DOC)
    assert out.ids == ["a", "c"] and out.texts == [NB_DOC, NB_DOC] and out.sigs.shape == (2, 128)
    assert out.sentences[0][0].startswith("Regjeringen") and len(out.sentences[0]) == 2


def test_chinese_document_end_to_end():
    cfg = DataConfig(inputs=["x"], languages=["zh"], min_words=5)
    doc = "今天天气很好，我们一起去公园散步吧！你想来吗？北京的秋天非常美丽。"
    out = process_chunk(cfg, [("z", doc)])
    assert out.langs == ["zh"] and out.texts == [doc]
    assert out.sentences == [["今天天气很好，我们一起去公园散步吧！", "你想来吗？", "北京的秋天非常美丽。"]]
