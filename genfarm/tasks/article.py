"""Article task: a `topic` (plus optional audience, length, style, language) -> a complete article with a title."""

from __future__ import annotations

import re
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, Field

from genfarm.rows import Prompt, chat, text_field
from genfarm.serve.protocol import SamplingParams, Usage
from genfarm.structured import parse_json
from genfarm.task import MappedTaskConfig, Route, RowSampling, Task

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
    structured: bool = Field(False, description="Ask for JSON {title, body} through guided decoding instead of a "
                             "title line (reliable titles; the text is JSON).")


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
    title: str = Field(description="The article's title (empty only when the model wrote none).")
    body: str = Field(description="The article without its title.")
    text: str
    finish_reason: str | None
    usage: Usage


class Article(Task):
    Config = ArticleConfig
    route = Route("/v1/articles", ArticleRequest, ArticleResponse,
                  "Write an article about a topic (the batch `article` task)")
    output_columns = {"title": pa.string(), "body": pa.string()}
    trimmable = True

    def required_columns(self) -> list[str]:
        return [self.config.columns.get("topic", "topic")]

    def prompt(self, row: dict) -> Prompt:
        topic = text_field(row, "topic", self.config.columns)
        opts = {name: text_field(row, name, self.config.columns, getattr(self.config, name)) for name in OPTIONAL}
        user = (
            f"Write a complete article about {topic} for {opts['audience']}. "
            f"Length: {opts['length']}. Style: {opts['style']}. Write it in {opts['language']}. "
            + ("Answer in JSON with the title and the article's body." if self.config.structured else
               "Put the title on the first line, then the article.")
        )
        return chat(self.config.system_prompt or SYSTEM, user)

    def sampling(self, row: dict) -> RowSampling | None:
        return RowSampling(structured={"json": SCHEMA, "disable_any_whitespace": True}) if self.config.structured \
            else None

    def parse(self, row: dict, text: str) -> dict:
        if self.config.structured:
            article = parse_json(text, SCHEMA)
            return {"title": clean_title(article["title"]), "body": article["body"].strip()}
        return split_title(text)


SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": MAX_TITLE_CHARS},
                                           "body": {"type": "string"}},
          "required": ["title", "body"], "additionalProperties": False}
LEADING_MARKUP = re.compile(r"^[\s#*<>=_~`\"'“”‘’\[\]|-]+")
TRAILING_MARKUP = re.compile(r"[\s#*<>=_~`\"'“”‘’\[\]|:-]+$")
LABEL = re.compile(r"^(?:title|headline|titel|titre|título)\s*[:\-–]\s*", re.IGNORECASE)


def clean_title(line: str) -> str:
    """A title without heading marks, emphasis, quotes, brackets or a 'Title:' label."""
    title = LEADING_MARKUP.sub("", line)
    title = LEADING_MARKUP.sub("", LABEL.sub("", title))
    return TRAILING_MARKUP.sub("", title)


def split_title(text: str) -> dict:
    """{title, body}: the first non-empty line is the title when it is short and more text follows (a first line
    that is a whole paragraph, or the only line, is no title); the body is the rest."""
    lines = text.strip().splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return {"title": "", "body": ""}
    title = clean_title(lines[first])
    rest = "\n".join(lines[first + 1:]).strip()
    if not rest or not title or len(title) > MAX_TITLE_CHARS:
        return {"title": "", "body": text.strip()}
    return {"title": title, "body": rest}
