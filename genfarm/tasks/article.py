"""Article task: a `topic` (plus optional audience, length, style, language) -> a complete article with a title."""

from __future__ import annotations

import re

from genfarm.spec import ArticleTask
from genfarm.tasks.base import Prompt, chat, text_field

SYSTEM = "You are an expert writer. You write complete, accurate, well-structured articles."
OPTIONAL = ("audience", "length", "style", "language")


class Article:
    extra_columns: tuple[str, ...] = ("title",)

    def __init__(self, spec: ArticleTask):
        self.spec = spec

    def required_columns(self) -> list[str]:
        return [self.spec.columns.get("topic", "topic")]

    def prompt(self, row: dict) -> Prompt:
        topic = text_field(row, "topic", self.spec.columns)
        opts = {name: text_field(row, name, self.spec.columns, getattr(self.spec, name)) for name in OPTIONAL}
        user = (
            f"Write a complete article about {topic} for {opts['audience']}. "
            f"Length: {opts['length']}. Style: {opts['style']}. Write it in {opts['language']}. "
            "Put the title on the first line, then the article."
        )
        return chat(self.spec.system_prompt or SYSTEM, user)

    def columns(self, row: dict, text: str) -> dict:
        return {"title": extract_title(text)}


MAX_TITLE_CHARS = 150


def extract_title(text: str) -> str:
    """The first non-empty line, without heading marks, a 'Title:' label or quotes; empty if the model wrote none
    (a first line that is a whole paragraph, or the only line, is not a title)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) < 2:
        return ""
    title = re.sub(r"^\s*#+\s*|^\s*title\s*:\s*", "", lines[0], flags=re.IGNORECASE).strip().strip("*\"'").strip()
    return title if len(title) <= MAX_TITLE_CHARS else ""
