"""Language identification with lingua (models ship inside the package; no download).

One detector per process, built from a candidate set: the recipe's languages plus the languages a
Scandinavian or Chinese corpus is most often confused with or contaminated by. Fewer candidates
load faster and score faster; lingua's high-accuracy mode (n-grams of 1 to 5 characters) is the
default because Bokmål and Nynorsk differ in short function words that its trigram-only
low-accuracy mode misses (one of five Nynorsk test sentences came out as Bokmål with 0.99 in
low-accuracy mode). High accuracy costs about 3x the time per document and a few seconds of model
loading per process; `data.langid_accuracy: low` trades that for speed on large corpora.

The detector is built in the parent process before the worker pool forks, so the workers share
its models copy-on-write instead of loading them again.
"""

from __future__ import annotations

from lingua import Language, LanguageDetector, LanguageDetectorBuilder

from kompakt.languages import check_language

# Confusers and contaminants: Scandinavian neighbours, English, German, Dutch, French, Finnish, and Chinese
# (free for Latin-script text, which lingua rules out by script). Each Latin-script language adds about
# 10% to the scoring time (measured: 6 candidates score twice as fast as 12).
CONFUSERS = ("nb", "nn", "da", "sv", "en", "de", "nl", "fr", "fi", "zh")
# Characters of a document that the detector sees. Scoring is linear in length and the first
# 2,000 characters (about 300 words) decide the language of a normal document.
LANGID_MAX_CHARS = 2000
UNKNOWN = "und"

_DETECTORS: dict[tuple, LanguageDetector] = {}


def language_of(code: str) -> Language:
    """The lingua Language of an ISO 639-1 code; ConfigError naming data.languages when unknown."""
    return Language.from_iso_code_639_1(check_language(code))


def candidates(languages: list[str]) -> tuple[str, ...]:
    """The recipe's languages and the confusers, sorted, so equal sets share one cached detector."""
    return tuple(sorted({*languages, *CONFUSERS}))


def get_detector(codes: tuple[str, ...], accuracy: str = "high") -> LanguageDetector:
    """The process's detector for these candidate codes, built (and its models loaded) once."""
    key = (codes, accuracy)
    if key not in _DETECTORS:
        builder = LanguageDetectorBuilder.from_languages(*[language_of(c) for c in codes])
        if accuracy == "low":
            builder = builder.with_low_accuracy_mode()
        # Preload now, so a worker's first chunk is not slowed down by lazy loading.
        _DETECTORS[key] = builder.with_preloaded_language_models().build()
    return _DETECTORS[key]


def detect(detector: LanguageDetector, text: str, keep: frozenset[str]) -> tuple[str, float, str]:
    """(label, score, most likely language overall) of a document.

    With `keep` (the recipe's languages) the score is the summed confidence of those languages and
    the label the most confident of them: close relatives that a recipe keeps together, such as
    Bokmål and Nynorsk, then do not split a document's vote below the threshold. Without `keep` the
    label is the most confident language overall. Text with no letters scores 0 as UNKNOWN.
    """
    values = detector.compute_language_confidence_values(text[:LANGID_MAX_CHARS])
    if not values or values[0].value <= 0.0:
        return UNKNOWN, 0.0, UNKNOWN
    top = values[0].language.iso_code_639_1.name.lower()
    if not keep:
        return top, values[0].value, top
    label, score = UNKNOWN, 0.0
    for v in values:  # sorted by confidence, highest first
        code = v.language.iso_code_639_1.name.lower()
        if code in keep:
            if label == UNKNOWN:
                label = code
            score += v.value
    return label, score, top
