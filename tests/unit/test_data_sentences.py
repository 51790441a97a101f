"""Rule-based sentence splitting: Norwegian abbreviations, ordinals, initials, and Chinese."""

from kompakt.data_prep.sentences import split_sentences


def test_norwegian_abbreviations_do_not_end_sentences():
    text = (
        "Vi kjøpte frukt, f.eks. epler og pærer, bl.a. fra Spania. Prisen var ca. 30 kr. per kilo, "
        "dvs. mer enn i fjor. Se nr. 5 osv. Det gjelder jf. avtalen også moms mv. Neste sak."
    )
    assert split_sentences(text, "nb") == [
        "Vi kjøpte frukt, f.eks. epler og pærer, bl.a. fra Spania.",
        "Prisen var ca. 30 kr. per kilo, dvs. mer enn i fjor.",
        "Se nr. 5 osv. Det gjelder jf. avtalen også moms mv. Neste sak.",
    ]


def test_ordinals_initials_and_real_boundaries():
    text = (
        "Vi feiret 17. mai i Bergen. H. Ibsen skrev Et dukkehjem. 2. Verdenskrig endte i 1945. "
        "Han ble født i 1950. Han døde! Hvorfor? «Ja,» sa hun. Nei."
    )
    assert split_sentences(text, "nb") == [
        "Vi feiret 17. mai i Bergen.",
        "H. Ibsen skrev Et dukkehjem.",
        "2. Verdenskrig endte i 1945.",
        "Han ble født i 1950.",
        "Han døde!",
        "Hvorfor?",
        "«Ja,» sa hun.",
        "Nei.",
    ]


def test_no_split_before_lowercase_and_hard_wraps_are_joined():
    text = "Det var kaldt. men ikke så kaldt\nsom i fjor. Nynorsk: Eg kjem no. Det er fint."
    assert split_sentences(text, "nn") == [
        "Det var kaldt. men ikke så kaldt som i fjor.",
        "Nynorsk: Eg kjem no.",
        "Det er fint.",
    ]


def test_chinese_splits_after_fullwidth_end_marks_and_keeps_them():
    text = "今天天气很好。我们去公园吧！你来吗？“好的。”他说，然后走了"
    assert split_sentences(text, "zh") == [
        "今天天气很好。",
        "我们去公园吧！",
        "你来吗？",
        "“好的。”",
        "他说，然后走了",
    ]
    assert "".join(split_sentences(text, "zh")) == text
