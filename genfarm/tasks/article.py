"""Article task: a `topic` (plus optional audience, length, style, language) -> a complete article with a title."""

from __future__ import annotations

import re
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, Field

from genfarm.rows import Prompt, chat, text_field
from genfarm.serve.protocol import SamplingParams, Usage
from genfarm.task import MappedTaskConfig, Route, Task

SYSTEM = "You are an expert writer. You write complete, accurate, well-structured articles."
OPTIONAL = ("audience", "length", "style", "language")
MAX_TITLE_CHARS = 150


class ArticleConfig(MappedTaskConfig):
    type: Literal["article"]
    menu_order = 10
    audience: str = "a general audience"
    length: str = "about 300 words"
    style: str = "clear and informative"
    language: str = "English"


class ArticleRequest(SamplingParams):
    topic: str = Field(min_length=1)
    audience: str | None = None
    length: str | None = None
    style: str | None = None
    language: str | None = None
    model: str | None = None


class ArticleResponse(BaseModel):
    id: str
    object: Literal["article"] = "article"
    model: str
    topic: str
    title: str = Field(description="The first line of the article when it is a title, else empty.")
    text: str
    finish_reason: str | None
    usage: Usage


class Article(Task):
    Config = ArticleConfig
    route = Route("/v1/articles", ArticleRequest, ArticleResponse,
                  "Write an article about a topic (the batch `article` task)")
    output_columns = {"title": pa.string()}

    def required_columns(self) -> list[str]:
        return [self.config.columns.get("topic", "topic")]

    def prompt(self, row: dict) -> Prompt:
        topic = text_field(row, "topic", self.config.columns)
        opts = {name: text_field(row, name, self.config.columns, getattr(self.config, name)) for name in OPTIONAL}
        user = (
            f"Write a complete article about {topic} for {opts['audience']}. "
            f"Length: {opts['length']}. Style: {opts['style']}. Write it in {opts['language']}. "
            "Put the title on the first line, then the article."
        )
        return chat(self.config.system_prompt or SYSTEM, user)

    def parse(self, row: dict, text: str) -> dict:
        return {"title": extract_title(text)}


def extract_title(text: str) -> str:
    """The first non-empty line, without heading marks, a 'Title:' label or quotes; empty if the model wrote none
    (a first line that is a whole paragraph, or the only line, is not a title)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if len(lines) < 2:
        return ""
    title = re.sub(r"^\s*#+\s*|^\s*title\s*:\s*", "", lines[0], flags=re.IGNORECASE).strip().strip("*\"'").strip()
    return title if len(title) <= MAX_TITLE_CHARS else ""
