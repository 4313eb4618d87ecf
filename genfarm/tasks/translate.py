"""Translate task: a `text` column + source/target language (per row or for the whole job) -> a translation."""

from __future__ import annotations

from genfarm.spec import TranslateTask
from genfarm.tasks.base import Prompt, chat, text_field

SYSTEM = "You are a professional translator. You translate faithfully and reply with the translation only."


class Translate:
    extra_columns: tuple[str, ...] = ("source_language", "target_language")

    def __init__(self, spec: TranslateTask):
        self.spec = spec

    def required_columns(self) -> list[str]:
        needed = [self.spec.columns.get("text", "text")]
        for name in ("source_language", "target_language"):
            if getattr(self.spec, name) is None:
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
        source, target = self.languages(row)
        user = f"Translate the following text from {source} to {target}.\n\n{text}"
        return chat(self.spec.system_prompt or SYSTEM, user)

    def columns(self, row: dict, text: str) -> dict:
        source, target = self.languages(row)
        return {"source_language": source, "target_language": target}
