"""The prompt of one text or document segment: languages by name, the glossary terms it uses, its context."""

from __future__ import annotations

import re
from typing import Protocol

from genfarm.rows import Prompt, chat
from genfarm.translation import languages
from genfarm.translation.segment import PLACEHOLDER_RE

SYSTEM = "You are a professional translator. You translate faithfully and reply with the translation only."


class PromptSettings(Protocol):
    """The translate task's settings a prompt uses (genfarm.tasks.translate.TranslateConfig has them)."""

    system_prompt: str | None
    glossary: dict[str, str | dict[str, str]]


def sentence_prompt(settings: PromptSettings, text: str, source: str, target: str) -> Prompt:
    """A short text between languages named as the row names them (names or codes)."""
    return chat(settings.system_prompt or SYSTEM, f"Translate the following text from {source} to {target}.\n\n{text}")


def segment_prompt(settings: PromptSettings, text: str, source: str | None, target: str, context: str | None,
                   terms: dict[str, str] | None = None) -> Prompt:
    """The prompt of one segment (BCP 47 codes; no source: the model is not told it); `terms` overrides the glossary
    lookup (the budget's worst case)."""
    into = languages.name(target)
    head = f"from {languages.name(source)} to {into}" if source else f"into {into}"
    lines = [f"Translate the following text {head}."]
    if PLACEHOLDER_RE.search(text):
        lines.append("Copy every marker such as ⟦1⟧ unchanged into the translation; each stands for code or a link.")
    terms = glossary_terms(settings.glossary, text, target) if terms is None else terms
    if terms:
        lines.append("Translate these terms exactly like this:")
        lines += [f"- {term} -> {translation}" for term, translation in terms.items()]
    if context is not None:
        lines.append("For context only (do not translate it), the text follows this passage:\n"
                     f"\"\"\"\n{context}\n\"\"\"")
    lines.append(f"Text to translate:\n{text}")
    return chat(settings.system_prompt or SYSTEM, "\n".join(lines))


def glossary_terms(glossary: dict[str, str | dict[str, str]], text: str, target: str) -> dict[str, str]:
    """The glossary entries a segment uses (whole words, any case), in the target language."""
    found = {}
    for term, translation in glossary.items():
        if isinstance(translation, dict):
            translation = translation.get(target)
        if translation and re.search(rf"(?<!\w){re.escape(term)}(?!\w)", text, re.IGNORECASE):
            found[term] = translation
    return found
