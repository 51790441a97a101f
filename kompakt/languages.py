"""ISO 639-1 language codes, checked against the codes lingua knows (core: recipes validate with it)."""

from __future__ import annotations

from kompakt.errors import ConfigError


def check_language(code: str, key: str = "data.languages"):
    """The lingua `IsoCode639_1` of `code`; a ConfigError naming `key` when it is not a code lingua knows."""
    from lingua import IsoCode639_1

    iso = getattr(IsoCode639_1, code.upper(), None) if code.isalpha() and len(code) == 2 else None
    if iso is None:
        hint = " (Norwegian is nb for Bokmål and nn for Nynorsk)" if code == "no" else ""
        raise ConfigError(f"{key}: {code!r} is not an ISO 639-1 code lingua knows{hint}; "
                          "use codes such as nb, nn, en, zh")
    return iso
