"""Rule-based sentence splitting.

Alphabetic languages (nb, nn, en, da, sv, de, ...): a sentence ends at . ! ? (or …) followed by
whitespace and then an uppercase letter, a digit or an opening quote/bracket/dash. A full stop does
not end a sentence after a known abbreviation (f.eks., bl.a., dvs., ...), after a single initial
("H. Ibsen") or after a one- or two-digit ordinal ("17. Mai", "2. Verdenskrig"); after a longer number
("født i 1950. Han ...") it does. Line breaks are treated as spaces: raw corpora are often
hard-wrapped, so a line is not a sentence.

Chinese and Japanese: a sentence ends after 。！？ (or ASCII !?, or …… ) together with any closing
quotes or brackets that follow; the punctuation stays with its sentence.
"""

from __future__ import annotations

import re

# Lowercased, with their final full stop. Norwegian first, then English and Latin ones that occur in
# Norwegian text. Words that are also ordinary sentence-final words ("min", "no" = "now" in Nynorsk)
# are left out on purpose.
ABBREVIATIONS = frozenset(
    """
    f.eks. bl.a. dvs. osv. nr. ca. kr. mv. m.v. jf. jfr. o.l. e.l. etc. pga. p.g.a. mht. m.h.t. ifm.
    i.f.m. evt. ev. iflg. ifølge. m.m. m.fl. o.a. o.s.v. s. ss. st. tlf. adr. hr. fr. frk. dr. prof.
    mr. mrs. ms. vs. e.g. i.e. vol. kap. pkt. ref. utg. årg. avd. forts. fig. tab. sml. e.kr. f.kr.
    kl. mill. mrd. jan. feb. apr. jun. jul. aug. sep. sept. okt. nov. des. adj. adv. subst. pron.
    el. resp. bd. bl.annet. ant. anm. gl. inkl. ekskl. eks. stk. nt. gt.
    """.split()
)

_CLOSERS = "\"'»”’)]}"
_OPENERS = "\"'«“‘([{-–—¿¡"
_LATIN_END_RE = re.compile(rf"[.!?…]+[{re.escape(_CLOSERS)}]*(?=\s)")
_CJK_END_RE = re.compile(rf"(?:[。！？!?]+|……)[{re.escape(_CLOSERS)}」』）】〕》〉]*")
_SPACE_RE = re.compile(r"\s+")
_ORDINAL_RE = re.compile(r"\d{1,2}\.")
CJK_LANGS = frozenset({"zh", "ja"})


def _is_boundary(text: str, m: re.Match) -> bool:
    """Whether the punctuation run matched by `m` (followed by one space) closes a sentence."""
    after = m.end() + 1
    if after >= len(text):
        return False
    nxt = text[after]
    if not (nxt.isupper() or nxt.isdigit() or nxt in _OPENERS):
        return False
    punct = m.group(0).rstrip(_CLOSERS)
    if punct != ".":
        return True
    word = text[text.rfind(" ", 0, m.start()) + 1 : m.start()].lstrip(_OPENERS).lower() + "."
    if word in ABBREVIATIONS:
        return False
    if len(word) == 2 and word[0].isalpha():  # a single initial: "H. Ibsen"
        return False
    return _ORDINAL_RE.fullmatch(word) is None


def split_latin(text: str) -> list[str]:
    """Split alphabetic-script text into sentences (see the module docstring for the rules)."""
    text = _SPACE_RE.sub(" ", text).strip()
    out, start = [], 0
    for m in _LATIN_END_RE.finditer(text):
        if _is_boundary(text, m):
            out.append(text[start : m.end()])
            start = m.end() + 1
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def split_cjk(text: str) -> list[str]:
    """Split Chinese or Japanese text after 。！？ (closing quotes kept with the sentence)."""
    out, start = [], 0
    for m in _CJK_END_RE.finditer(text):
        piece = _SPACE_RE.sub(" ", text[start : m.end()]).strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = _SPACE_RE.sub(" ", text[start:]).strip()
    if tail:
        out.append(tail)
    return out


def split_sentences(text: str, lang: str) -> list[str]:
    """Sentences of a normalised document in language `lang` (ISO 639-1)."""
    return split_cjk(text) if lang in CJK_LANGS else split_latin(text)
