"""One text through the whole translation flow at once (the online endpoint): segment it within the model's
budget, prompt each segment, generate, reassemble. Batch jobs run the same steps spread over the pipeline: the
splitter makes the segments rows, the task prompts them, documents.py reassembles them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from genfarm.errors import UserError
from genfarm.rows import Prompt
from genfarm.spec import EngineSpec, SamplingSpec
from genfarm.translation.assemble import reassemble
from genfarm.translation.prompts import segment_prompt
from genfarm.translation.segment import Segment, segment_document
from genfarm.translation.splitter import DocumentSettings, segment_budget

# Answers to a list of prompts, in order: (text, finish_reason) each.
Generate = Callable[[list[Prompt]], Awaitable[list[tuple[str, str | None]]]]


class BudgetTooSmall(ValueError):
    """sampling.max_tokens leaves no room to translate the text, even in pieces."""


@dataclass(frozen=True)
class Translated:
    text: str
    segments: int  # pieces sent to the model
    finish_reason: str  # "length" when any piece was cut at max_tokens


def text_segments(settings: DocumentSettings, text: str, tokenizer, engine: EngineSpec,
                  sampling: SamplingSpec) -> list[Segment]:
    """The text in pieces that fit the model beside their answers (the batch jobs' Markdown-aware segmenter)."""
    def count(piece: str) -> int:
        return len(tokenizer.encode(piece, add_special_tokens=False))

    try:
        budget = segment_budget(settings, engine, sampling, tokenizer)
    except UserError as err:  # a small max_tokens still translates a text that small
        if count(text) > sampling.max_tokens:
            raise BudgetTooSmall(f"max_tokens {sampling.max_tokens} is too small to translate this text in pieces "
                                 f"({err.problem})") from None
        budget = sampling.max_tokens
    return segment_document(text, count, budget)


async def translate_text(settings: DocumentSettings, text: str, source: str | None, target: str, tokenizer,
                         engine: EngineSpec, sampling: SamplingSpec, generate: Generate) -> Translated:
    segments = text_segments(settings, text, tokenizer, engine, sampling)
    pieces = [s for s in segments if s.translate]
    answers = await generate([segment_prompt(settings, s.text, source, target, None) for s in pieces])
    document = reassemble(segments, {s.index: answer for s, (answer, _) in zip(pieces, answers)})
    cut = any(reason == "length" for _, reason in answers)
    return Translated(document.text, len(pieces), "length" if cut else "stop")
