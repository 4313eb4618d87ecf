"""Tasks turn a dataset row into a prompt, and generated text into extra output columns."""

from __future__ import annotations

from typing import Protocol

from genfarm.spec import ArticleTask, TemplateTask, TranslateTask
from genfarm.tasks.article import Article
from genfarm.tasks.base import Prompt
from genfarm.tasks.template import Template
from genfarm.tasks.translate import Translate


class Task(Protocol):
    extra_columns: tuple[str, ...]  # output columns the task adds beside output_text

    def required_columns(self) -> list[str]: ...

    def prompt(self, row: dict) -> Prompt: ...

    def columns(self, row: dict, text: str) -> dict: ...


def make_task(spec: ArticleTask | TranslateTask | TemplateTask) -> Task:
    return {"article": Article, "translate": Translate, "template": Template}[spec.type](spec)
