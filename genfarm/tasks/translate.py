"""Translate task: a `text` column + source/target language (per row or for the whole job) -> a translation.

With documents (task.target_languages, or task.segment.enabled), every row the engine sees is one segment of a
document for one target language, carried in the row's `_gf_segment` (see genfarm/translation/rows.py); its prompt
adds the glossary terms the segment uses, the previous segment for context, and a rule to keep placeholders.
"""

from __future__ import annotations

import re

import pyarrow as pa

from genfarm.spec import TranslateTask
from genfarm.tasks.base import Prompt, chat, text_field
from genfarm.translation import languages
from genfarm.translation.segment import PLACEHOLDER_RE

SYSTEM = "You are a professional translator. You translate faithfully and reply with the translation only."
SEGMENT_COLUMNS = ("document_id", "segment_index", "segment_count")


class Translate:
    def __init__(self, spec: TranslateTask):
        self.spec = spec
        self.extra_columns: tuple[str, ...] = ("source_language", "target_language")
        self.column_types = {"segment_index": pa.int32(), "segment_count": pa.int32()}
        if spec.documents:
            self.extra_columns += SEGMENT_COLUMNS

    def required_columns(self) -> list[str]:
        needed = [self.spec.columns.get("text", "text")]
        for name in ("source_language", "target_language"):
            if getattr(self.spec, name) is None and not (name == "target_language" and self.spec.target_languages):
                needed.append(self.spec.columns.get(name, name))
        return needed

    def languages(self, row: dict) -> tuple[str, str]:
        cols = self.spec.columns
        return (
            text_field(row, "source_language", cols, self.spec.source_language),
            text_field(row, "target_language", cols, self.spec.target_language),
        )

    def prompt(self, row: dict) -> Prompt:
        text = text_field(row, "text", self.spec.columns)
        segment = row.get("_gf_segment")
        if segment is not None:
            return segment_prompt(self.spec, text, segment["source_language"], segment["target_language"],
                                  segment["context"])
        source, target = self.languages(row)
        user = f"Translate the following text from {source} to {target}.\n\n{text}"
        return chat(self.spec.system_prompt or SYSTEM, user)

    def columns(self, row: dict, text: str) -> dict:
        segment = row.get("_gf_segment")
        if segment is not None:
            return {"source_language": segment["source_language"], "target_language": segment["target_language"],
                    "document_id": segment["document_id"], "segment_index": segment["index"],
                    "segment_count": segment["count"]}
        source, target = self.languages(row)
        return {"source_language": source, "target_language": target}


def segment_prompt(spec: TranslateTask, text: str, source: str, target: str, context: str | None,
                   terms: dict[str, str] | None = None) -> Prompt:
    """The prompt of one document segment; `terms` overrides the glossary lookup (the budget's worst case)."""
    lines = [f"Translate the following text from {languages.name(source)} to {languages.name(target)}."]
    if PLACEHOLDER_RE.search(text):
        lines.append("Copy every marker such as ⟦1⟧ unchanged into the translation; each stands for code or a link.")
    terms = glossary_terms(spec.glossary, text, target) if terms is None else terms
    if terms:
        lines.append("Translate these terms exactly like this:")
        lines += [f"- {term} -> {translation}" for term, translation in terms.items()]
    if context is not None:
        lines.append("For context only (do not translate it), the text follows this passage:\n"
                     f"\"\"\"\n{context}\n\"\"\"")
    lines.append(f"Text to translate:\n{text}")
    return chat(spec.system_prompt or SYSTEM, "\n".join(lines))


def glossary_terms(glossary: dict[str, str | dict[str, str]], text: str, target: str) -> dict[str, str]:
    """The glossary entries a segment uses (whole words, any case), in the target language."""
    found = {}
    for term, translation in glossary.items():
        if isinstance(translation, dict):
            translation = translation.get(target)
        if translation and re.search(rf"(?<!\w){re.escape(term)}(?!\w)", text, re.IGNORECASE):
            found[term] = translation
    return found
