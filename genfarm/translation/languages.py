"""BCP 47 language tags: validation, normalization, and the English names prompts use.

Only the tag shapes translation jobs need (language[-Script][-REGION]) and a table of common languages; an unknown
primary language is an error, because a model cannot be asked to translate into a code nobody can name.
"""

from __future__ import annotations

import re

from genfarm.rows import text_field

LANGUAGES = {
    "af": "Afrikaans", "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan", "cs": "Czech",
    "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English", "es": "Spanish",
    "et": "Estonian", "eu": "Basque", "fa": "Persian", "fi": "Finnish", "fil": "Filipino", "fr": "French",
    "ga": "Irish", "gl": "Galician", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian",
    "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese", "ko": "Korean", "lt": "Lithuanian",
    "lv": "Latvian", "ms": "Malay", "mt": "Maltese", "nb": "Norwegian Bokmål", "nl": "Dutch", "nn": "Norwegian Nynorsk",
    "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak",
    "sl": "Slovenian", "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "th": "Thai",
    "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
}
SCRIPTS = {"Hans": "Simplified", "Hant": "Traditional", "Latn": "Latin script", "Cyrl": "Cyrillic script"}
REGIONS = {
    "AR": "Argentina", "AT": "Austria", "AU": "Australia", "BE": "Belgium", "BR": "Brazil", "CA": "Canada",
    "CH": "Switzerland", "CN": "China", "DE": "Germany", "ES": "Spain", "FR": "France", "GB": "United Kingdom",
    "HK": "Hong Kong", "IE": "Ireland", "IN": "India", "MX": "Mexico", "NZ": "New Zealand", "PT": "Portugal",
    "TW": "Taiwan", "US": "United States", "419": "Latin America",
}
TAG = re.compile(r"^(?P<lang>[A-Za-z]{2,3})(?:-(?P<script>[A-Za-z]{4}))?(?:-(?P<region>[A-Za-z]{2}|\d{3}))?$")
BY_NAME = {name.lower(): code for code, name in LANGUAGES.items()}


class UnknownLanguage(ValueError):
    pass


def normalize(tag: str) -> str:
    """'PT-br' -> 'pt-BR'; raises UnknownLanguage for anything that is not a tag of a known language."""
    match = TAG.match(tag.strip().replace("_", "-")) if isinstance(tag, str) else None
    if not match or match["lang"].lower() not in LANGUAGES:
        examples = "de, fr, es, pt-BR, zh-Hans"
        raise UnknownLanguage(f"{tag!r} is not a BCP 47 language code genfarm knows (e.g. {examples})")
    parts = [match["lang"].lower()]
    if match["script"]:
        parts.append(match["script"].title())
    if match["region"]:
        parts.append(match["region"].upper())
    return "-".join(parts)


def to_code(value: str) -> str:
    """A BCP 47 code from a code or an English language name ('German' -> 'de'), for columns written either way."""
    if isinstance(value, str) and value.strip().lower() in BY_NAME:
        return BY_NAME[value.strip().lower()]
    return normalize(value)


def name(tag: str) -> str:
    """The English name a prompt uses: 'pt-BR' -> 'Portuguese (Brazil)', 'zh-Hant' -> 'Chinese (Traditional)'."""
    match = TAG.match(normalize(tag))
    details = [SCRIPTS.get(match["script"], match["script"]) if match["script"] else None,
               REGIONS.get(match["region"], match["region"]) if match["region"] else None]
    details = [d for d in details if d]
    base = LANGUAGES[match["lang"]]
    return f"{base} ({', '.join(details)})" if details else base


class LanguageError(ValueError):
    """A language that is missing or unknown, with the field it came from."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def resolve(row: dict, columns: dict[str, str], source: str | None, target: str | None,
            targets: list[str] | None = None, codes: bool = True) -> tuple[str, list[str]]:
    """(source, targets) of one text: the job's or service's settings (`source`, `target` or several `targets`),
    else the row's `source_language` / `target_language` columns (mapped through `columns`). With `codes`, each is
    a BCP 47 code (an unknown one raises LanguageError); without, as written, since a prompt can name any language.
    A missing or empty value raises the row's RowError, unless its default is "" (a source the caller may leave
    unnamed): then it is ""."""
    def read(field: str, default: str | None) -> str:
        found = text_field(row, field, columns, default)
        if not codes or not found:
            return found
        try:
            return to_code(found)
        except UnknownLanguage as err:
            raise LanguageError(field, str(err)) from None

    if targets:
        return read("source_language", source), list(targets)
    return read("source_language", source), [read("target_language", target)]
