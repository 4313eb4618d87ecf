"""Quality checks on generated text, and the policy for a text that fails them.

Every check works with any model: it looks at the text (and the task's hints: the language the text should be in,
the source it translates), never at the model. A job file's `quality:` section sets thresholds and what to do; each
task brings its defaults (Task.quality_defaults). A row whose text fails a check is generated again with a new
derived seed, up to `retries` times; the attempt with the fewest failed checks is kept, with the checks it still
fails in its `quality` column, or it becomes a `quality` error row (`on_failure: error`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import py3langid

from genfarm.spec import QualitySpec

WORD = re.compile(r"\w+")
SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]*_]*(?=\s|$)")
NGRAM = 3
MIN_WORDS_FOR_LANGUAGE = 4  # language identification is guesswork below this
LENGTH_SLACK_WORDS = 4  # a 2-word heading may come back as 5 words without being commentary


CHECKS = ("truncated", "empty", "repetition", "min_words", "max_words", "language", "length_ratio")
CHECK_DEFAULTS = {"truncated": "flag", "empty": True, "repetition": 0.5, "min_words": False, "max_words": False,
                  "language": False, "length_ratio": False}


def checks_in_force(spec: QualitySpec, defaults: dict) -> Checks:
    """The checks in force: genfarm's defaults, the task's, then what the job file set (None: the task's default;
    false turns one off)."""
    values = {**CHECK_DEFAULTS, **defaults, **spec.model_dump(include=set(CHECKS), exclude_none=True)}
    return Checks(**{name: (None if values[name] is False else values[name]) for name in CHECKS})


@dataclass(frozen=True)
class Checks:
    truncated: str | None  # off | flag | trim | regenerate
    empty: bool | None
    repetition: float | None
    min_words: int | None
    max_words: int | None
    language: bool | None
    length_ratio: tuple[float, float] | None

    @property
    def regenerates_truncated(self) -> bool:
        return self.truncated == "regenerate"

    @property
    def trims(self) -> bool:
        return self.truncated in ("trim", "regenerate")


@dataclass(frozen=True)
class Hints:
    """What a task tells the checks about one row."""

    language: str | None = None  # BCP 47 code the text should be in
    source: str | None = None  # the text this one translates or rewrites


def failures(text: str, finish_reason: str | None, checks: Checks, hints: Hints) -> list[str]:
    """The names of the checks a text fails, in a fixed order."""
    words = WORD.findall(text)
    failed = []
    if checks.truncated not in (None, "off") and finish_reason == "length":
        failed.append("truncated")
    if checks.empty and not words:
        failed.append("empty")
    if checks.repetition is not None and repetition(words) > checks.repetition:
        failed.append("repetition")
    if checks.min_words is not None and words and len(words) < checks.min_words:
        failed.append("min_words")
    if checks.max_words is not None and len(words) > checks.max_words:
        failed.append("max_words")
    if checks.language and hints.language and len(words) >= MIN_WORDS_FOR_LANGUAGE:
        if detect_language(text) != hints.language.split("-")[0].lower():
            failed.append("language")
    if checks.length_ratio is not None and hints.source is not None:
        low, high = checks.length_ratio
        source_words = len(WORD.findall(hints.source))
        if not low * source_words - LENGTH_SLACK_WORDS <= len(words) <= high * source_words + LENGTH_SLACK_WORDS:
            failed.append("length_ratio")
    return failed


def repetition(words: list[str]) -> float:
    """Share of word 3-grams that repeat an earlier one: ~0 for prose, near 1 for a loop."""
    grams = [tuple(w.lower() for w in words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)]
    if len(grams) < NGRAM:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def detect_language(text: str) -> str:
    """ISO 639-1 code of a text's language (py3langid's model, 97 languages; loaded once per process, ~1.5 s)."""
    return py3langid.classify(text)[0]


def trim(text: str) -> str:
    """A text cut off mid-sentence, back to its last complete sentence (or paragraph); unchanged if it has none."""
    body = text.rstrip()
    paragraph = body.rfind("\n\n")
    ends = [m.end() for m in SENTENCE_END.finditer(body)]
    cut = max([e for e in ends if e > 0] + [paragraph if paragraph > 0 else 0])
    return body[:cut].rstrip() if cut > 0 else text
