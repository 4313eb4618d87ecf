"""Rows that share a prompt prefix run together, so an engine's prefix cache serves the prefix once.

Content jobs share long prefixes: one document with many questions, a system prompt with a glossary, a few-shot
template. vLLM keeps the KV cache of prompt prefixes it computed (automatic prefix caching) until newer prompts push
them out; rows with the same prefix scattered over a job and over the engines miss it. A read task therefore takes a
window of rows at a time and hands them on ordered by their prompt's text: sorted text puts the rows that share the
longest prefixes next to each other, whatever the template, so they land in the same batches (one engine) at the
same time. A window whose rows share nothing beyond what every row of it shares (one system prompt over varied
topics) gains nothing from sorting and keeps the input's order, which is what people expect to see first in the
output; each row has its id either way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from genfarm.spec import TaskConfig
from genfarm.task import make_task

WINDOW_CHARS = 64 << 20  # prompt text a read task holds at once, however many rows the window allows
# Sorting pays when rows share more with a neighbour than the whole window shares: at least a KV cache block's worth
# (16-128 tokens, a few characters each) for at least a quarter of the rows.
MIN_SHARED_CHARS = 256
MIN_SHARING_ROWS = 0.25


class PromptOrder:
    """Built on the driver and pickled to the read tasks; each builds the task once, to render the prompts."""

    def __init__(self, task: TaskConfig, window_rows: int):
        self.task_spec, self.window_rows = task, window_rows
        self._task = None

    def __getstate__(self) -> dict:
        return {"task_spec": self.task_spec, "window_rows": self.window_rows, "_task": None}

    def key(self, row: dict) -> str:
        """The prompt's text, as the task renders it before the chat template (the same for every model)."""
        if row.get("_gf_error"):
            return ""  # an error row: the engine actor writes it, at no cost
        if self._task is None:
            self._task = make_task(self.task_spec)
        try:
            prompt = self._task.prompt(row)
        except Exception:  # noqa: BLE001 - a row the task refuses: its engine actor writes the typed error row
            return ""
        if prompt.messages is None:
            return prompt.text or ""
        return "\n".join(m["role"] + "\x00" + (m["content"] if isinstance(m["content"], str)
                                               else json.dumps(m["content"], sort_keys=True))
                         for m in prompt.messages)

    def arrange(self, rows: Iterable[dict]) -> Iterator[dict]:
        """`rows` again, each window of them sorted by prompt where its rows share prefixes."""
        window: list[tuple[str, int, dict]] = []
        held = 0
        for row in rows:
            key = self.key(row)
            window.append((key, len(window), row))
            held += len(key)
            if len(window) >= self.window_rows or held >= WINDOW_CHARS:
                yield from ordered(window)
                window, held = [], 0
        yield from ordered(window)


def ordered(window: list[tuple[str, int, dict]]) -> Iterator[dict]:
    """The window's rows sorted by prompt if enough of them share a prefix beyond the window's common one, else
    as they came."""
    by_prompt = sorted(window, key=lambda item: item[:2])
    prompts = [key for key, _, _ in by_prompt if key]  # error rows ("") share nothing
    if len(prompts) > 1:
        common = len(os.path.commonprefix([prompts[0], prompts[-1]]))  # what every row shares (sorted: first, last)
        sharing = sum(len(os.path.commonprefix([a[0], b[0]])) - common >= MIN_SHARED_CHARS
                      for a, b in zip(by_prompt, by_prompt[1:]))
        if sharing < MIN_SHARING_ROWS * len(by_prompt):
            by_prompt = window
    return (row for _, _, row in by_prompt)
