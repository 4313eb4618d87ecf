"""Generate a batch's prompts, check every text, and generate the ones that fail again (genfarm/quality.py).

A row is one unit here, however often it is generated: only the attempt kept is committed, so a regenerated row is
still one row for the ledger, and a batch that dies mid-retry is simply generated again.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from genfarm.engine import Completion
from genfarm.quality import Checks, failures, trim
from genfarm.rows import RowError
from genfarm.spec import QualitySpec, SamplingSpec
from genfarm.task import Task

GROWTH = 1.5  # more room per regeneration of a text cut at max_tokens


def row_seed(base: int | None, row_id: str, attempt: int = 0) -> int | None:
    """Per-row seed: the same row gets the same sample wherever and in whatever batch it runs; each regeneration
    of it gets its own, derived the same way."""
    if base is None:
        return None
    key = f"{base}:{row_id}" if attempt == 0 else f"{base}:{row_id}#{attempt}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") & 0x7FFFFFFF


@dataclass
class Sample:
    """One generated text of a row, checked."""

    completion: Completion
    columns: dict  # the task's parsed columns (empty when the text did not parse)
    failed: list[str]  # the quality checks it fails ("schema": it did not parse as the task asked)
    error: RowError | None  # why it did not parse
    seed: int | None
    sampling: SamplingSpec
    fixes: list[str] = field(default_factory=list)  # what was done to it ("trimmed")


@dataclass
class Work:
    """A row on its way through the engine: its prompt, and the best attempt so far."""

    row: dict
    prompt: str
    ids: list[int]
    sampling: SamplingSpec
    extra: dict
    seed: int | None = None  # the row's own seed, if its task gave one
    attempts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0  # over every attempt: what the engine spent
    samples: list[Sample] | None = None
    failure: Exception | None = None  # the first attempt's error (a timeout, a prompt vLLM refused)

    @property
    def score(self) -> int:
        return sum(len(s.failed) for s in self.samples) if self.samples else 1 << 30


class GreedyAnswers:
    """The answers an engine actor already gave to greedy prompts. A greedy answer depends only on the prompt and
    the sampling parameters, so a prompt that comes again (common in real datasets) is answered from here instead of
    generated again; each row still gets its own result row. Bounded: the oldest answers are forgotten first.
    Shared by the batches in flight in one engine actor, which call it from their own threads."""

    def __init__(self, size: int = 4096):
        self.size, self.answers, self.lock = size, OrderedDict(), threading.Lock()

    @staticmethod
    def key(ids: list[int], sampling: SamplingSpec, extra: dict) -> tuple | None:
        if sampling.temperature != 0:
            return None  # sampled answers differ by seed: each row keeps its own
        return tuple(ids), json.dumps(sampling.model_dump(exclude={"seed"}), sort_keys=True), \
            json.dumps(extra, sort_keys=True, default=str)

    def generate(self, engine, ids: list[list[int]], sampling: list[SamplingSpec], seeds: list,
                 extras: list) -> tuple[list, int]:
        """engine.generate, with every greedy prompt generated at most once; and how many answers were reused."""
        keys = [self.key(i, s, e) for i, s, e in zip(ids, sampling, extras)]
        with self.lock:  # what is known now: answers may be forgotten while this batch generates
            known = {key: self.answers[key] for key in keys if key is not None and key in self.answers}
        todo = {}  # index of the first request of each prompt that must be generated, by key (or by index)
        for index, key in enumerate(keys):
            if key is None or (key not in known and key not in todo):
                todo[key if key is not None else ("row", index)] = index
        fresh = engine.generate(*(([column[i] for i in todo.values()]) for column in (ids, sampling, seeds, extras)))
        generated = dict(zip(todo.values(), fresh))
        with self.lock:
            for key, index in todo.items():
                if keys[index] is not None and not isinstance(generated[index], Exception):
                    self.answers[key] = generated[index]
                    if len(self.answers) > self.size:
                        self.answers.popitem(last=False)
        results = [generated[index] if index in generated else known[key] if key in known else generated[todo[key]]
                   for index, key in enumerate(keys)]
        return results, len(keys) - len(generated)


def generate_checked(engine, task: Task, works: list[Work], base_seed: int | None, checks: Checks,
                     quality: QualitySpec, max_model_len: int, answers: GreedyAnswers | None = None) -> int:
    """Generate every work, then again those whose texts fail a check, up to quality.retries times; each work
    keeps its best attempt. Returns how many answers were reused instead of generated (identical greedy prompts).
    Raises what the engine raises for the whole batch (EngineDead)."""
    answers = answers or GreedyAnswers(size=0)
    todo, reused = works, 0
    for attempt in range(quality.retries + 1):
        if not todo:
            break
        plans = [attempt_plan(work, attempt, base_seed, checks, quality, max_model_len) for work in todo]
        results, again = answers.generate(engine, [w.ids for w in todo], [p[0] for p in plans],
                                          [p[1] for p in plans], [p[2] for p in plans])
        reused += again
        for work, (sampling, seed, _), result in zip(todo, plans, results):
            work.attempts = attempt + 1
            if isinstance(result, Exception):
                if work.samples is None:
                    work.failure = result
                continue  # a failed regeneration keeps the earlier attempt
            work.prompt_tokens = result.prompt_tokens
            work.generated_tokens += sum(c.completion_tokens for c in result.completions)
            samples = [check(task, work.row, c, seed, sampling, checks) for c in result.completions]
            # A later attempt wins ties: it had more room, or a new seed and the same number of failed checks.
            if work.samples is None or sum(len(s.failed) for s in samples) <= work.score:
                work.samples, work.failure = samples, None
        todo = [w for w in todo if w.samples and not any(fatal(s) for s in w.samples)
                and any(regenerable(s, checks) for s in w.samples)]
    for work in works:
        for sample in work.samples or ():
            finish(task, work.row, sample, checks)
    return reused


def attempt_plan(work: Work, attempt: int, base_seed: int | None, checks: Checks, quality: QualitySpec,
                 max_model_len: int) -> tuple[SamplingSpec, int | None, dict]:
    """Sampling, seed and engine parameters of one attempt: a new seed, more room for a text that was cut short,
    and the repetition penalty, on every regeneration."""
    sampling, extra = work.sampling, work.extra
    if work.seed is not None:  # the row's own seed, as it asked; regenerations derive theirs from it
        base_seed = work.seed
        if attempt == 0:
            return sampling, work.seed, extra
    if attempt == 0:
        return sampling, row_seed(base_seed, work.row["_gf_id"]), extra
    if checks.regenerates_truncated and any("truncated" in s.failed for s in work.samples or ()):
        room = max_model_len - len(work.ids)
        longer = min(room, math.ceil(sampling.max_tokens * GROWTH ** attempt))
        sampling = sampling.model_copy(update={"max_tokens": longer})
    if quality.repetition_penalty is not None:
        extra = {**extra, "repetition_penalty": quality.repetition_penalty}
    return sampling, row_seed(base_seed, work.row["_gf_id"], attempt), extra


def check(task: Task, row: dict, completion: Completion, seed: int | None, sampling: SamplingSpec,
          checks: Checks) -> Sample:
    failed = failures(completion.text, completion.finish_reason, checks, task.hints(row))
    try:
        return Sample(completion, task.parse_completion(row, completion), failed, None, seed, sampling)
    except RowError as err:
        return Sample(completion, {}, failed + (["schema"] if err.kind == "invalid_output" else []), err, seed,
                      sampling)


def regenerable(sample: Sample, checks: Checks) -> bool:
    """Whether the sample fails a check that another attempt may pass (a cut text only with truncated: regenerate;
    with trim it is trimmed instead)."""
    return any(name != "truncated" or checks.regenerates_truncated for name in sample.failed)


def fatal(sample: Sample) -> bool:
    """A parse error that no regeneration mends (the task refuses the row itself)."""
    return sample.error is not None and sample.error.kind != "invalid_output"


def finish(task: Task, row: dict, sample: Sample, checks: Checks) -> None:
    """A text still cut at max_tokens is trimmed back to its last complete sentence, where the task allows it."""
    if "truncated" in sample.failed and checks.trims and task.trimmable and sample.error is None:
        text = trim(sample.completion.text)
        if text != sample.completion.text:
            trimmed = Completion(text, sample.completion.finish_reason, sample.completion.completion_tokens,
                                 sample.completion.index, sample.completion.logprob)
            try:
                columns = task.parse_completion(row, trimmed)
            except RowError:  # the task cannot read the trimmed text (a structured answer cut short): keep it whole
                return
            sample.completion, sample.columns = trimmed, columns
            sample.failed.remove("truncated")
            sample.fixes.append("trimmed")
