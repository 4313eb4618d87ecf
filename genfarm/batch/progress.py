"""Live progress of a batch job: rows done/total, generated tokens/s and ETA, from the workers' stats rows, and
the engines' own running token counts (so tok/s is live from the first seconds, before any batch is done)."""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        rate = task.fields.get("tokens", 0) / max(time.monotonic() - task.fields.get("t0", time.monotonic()), 1e-9)
        return Text(f"{rate:,.0f} tok/s", style="cyan")


class LiveTokens:
    """A Ray actor (no CPU) the engine actors add their generated tokens to as they go, for the driver to read."""

    def __init__(self):
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def total(self) -> int:
        return self.tokens


def report_tokens(engine, counter, stop: threading.Event, every_s: float = 1.0) -> None:
    """An engine actor's thread: sends the engine's new tokens to the job's LiveTokens counter every second."""
    sent = 0
    while not stop.wait(every_s):
        current = engine.tokens_estimate
        if current > sent:
            counter.add.remote(current - sent)
            sent = current


class JobProgress:
    """A rich progress bar when attached to a terminal, a plain line every few seconds otherwise."""

    def __init__(self, total: int, already_done: int, enabled: bool = True):
        self.total, self.done, self.tokens, self.errors, self.flagged = total, already_done, 0, 0, 0
        self.tokens_live = 0  # the engines' running estimate; the exact count comes with each batch's stats
        self.reused = 0  # greedy answers given again to identical prompts
        self.prompt_tokens = self.cached_tokens = 0  # what the engines took in, and what their prefix caches held
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.enabled = enabled
        self.t0 = self.last_line = time.monotonic()
        self.bar = Progress(
            TextColumn("[bold]generating"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} rows"),
            TokensPerSecond(), TextColumn("{task.fields[errors]} errors"),
            TextColumn("{task.fields[flagged]} flagged"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.task_id = self.bar.add_task("job", total=total, completed=already_done, tokens=0, errors=0, flagged=0,
                                     t0=self.t0)

    def __enter__(self) -> JobProgress:
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.bar.stop()

    def update(self, rows: int, tokens: int, errors: int, flagged: int = 0, reused: int = 0, prompt_tokens: int = 0,
               cached_tokens: int = 0) -> None:
        self.reused += reused
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.done += rows
        self.tokens += tokens
        self.errors += errors
        self.flagged += flagged
        self.show()

    def show(self) -> None:
        self.bar.update(self.task_id, completed=self.done, tokens=self.shown_tokens, errors=self.errors,
                        flagged=self.flagged)
        if self.enabled and not self.live and time.monotonic() - self.last_line > 5:
            self.last_line = time.monotonic()
            elapsed = self.last_line - self.t0
            self.console.print(f"{self.done:,}/{self.total:,} rows, {self.shown_tokens / elapsed:,.0f} tok/s, "
                               f"{self.errors} errors, {self.flagged} flagged, {elapsed:,.0f}s elapsed",
                               highlight=False)

    @property
    def shown_tokens(self) -> int:
        return max(self.tokens, self.tokens_live)

    def follow(self, counter, every_s: float = 1.0) -> threading.Event:
        """Read the engines' LiveTokens counter every second until the returned event is set."""
        import ray

        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(every_s):
                try:
                    self.tokens_live = ray.get(counter.total.remote(), timeout=every_s * 5)
                except Exception:  # noqa: BLE001, S112 - a slow answer only delays the live figure
                    continue
                self.show()

        threading.Thread(target=poll, name="genfarm-progress", daemon=True).start()
        return stop
