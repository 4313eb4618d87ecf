"""Rows that share a prompt prefix run together, so an engine's prefix cache serves the prefix once.

Content jobs share long prefixes: one document with many questions, a system prompt with a glossary, a few-shot
template. vLLM keeps the KV cache of prompt prefixes it computed (automatic prefix caching) until newer prompts push
them out; rows with the same prefix scattered over a job and over the engines miss it. A read task therefore takes a
window of rows at a time and hands them on ordered by their prompt's text: sorted text puts the rows that share the
longest prefixes next to each other, whatever the template, so they land in the same batches (one engine) at the
same time. The order of rows in a job's output is not part of its contract (each row has its id); identical prompts
end up side by side too, which is where an engine answers a greedy prompt once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from genfarm.spec import TaskConfig
from genfarm.task import make_task

WINDOW_CHARS = 64 << 20  # prompt text a read task holds at once, however many rows the window allows


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
        """`rows` again, each window of them sorted by prompt."""
        window: list[tuple[str, int, dict]] = []
        held = 0
        for row in rows:
            key = self.key(row)
            window.append((key, len(window), row))
            held += len(key)
            if len(window) >= self.window_rows or held >= WINDOW_CHARS:
                yield from (row for _, _, row in sorted(window, key=lambda item: item[:2]))
                window, held = [], 0
        yield from (row for _, _, row in sorted(window, key=lambda item: item[:2]))
