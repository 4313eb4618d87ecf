"""Put translated segments back into a document: structure, verbatim blocks and protected spans as they were.

A model's answer is fitted to its segment: a heading stays one line, a paragraph stays one paragraph (blank lines
inside are closed up, so paragraph counts survive), a repeated list marker is dropped, and every placeholder is
replaced by its original span. A span the model lost is appended to its segment rather than dropped, so code and
URLs are never lost; such losses are counted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from genfarm.translation.segment import PLACEHOLDER_RE, Segment

BLANK_LINES = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")


@dataclass
class Reassembled:
    text: str
    missing: list[int] = field(default_factory=list)  # translatable segments without a translation
    lost_placeholders: int = 0  # protected spans the model dropped (appended to their segment)

    @property
    def complete(self) -> bool:
        return not self.missing


def reassemble(segments: Sequence[Segment], translations: Mapping[int, str] | Sequence[str | None]) -> Reassembled:
    """The document from its segments and the translations of the translatable ones (keyed by segment index, or a
    list aligned with `segments`). A segment without a translation keeps its source text and is listed in
    `missing`: the caller decides whether a partial document is acceptable, it is never passed off as complete."""
    if not isinstance(translations, Mapping):
        translations = {i: text for i, text in enumerate(translations) if text is not None}
    result = Reassembled("")
    pieces = []
    for segment in segments:
        if not segment.translate:
            body = segment.text
        elif segment.index in translations:
            body, lost = fit(translations[segment.index], segment)
            result.lost_placeholders += lost
        else:
            body = segment.source.replace("\n", "\n" + segment.line_prefix)
            result.missing.append(segment.index)
        pieces.append(segment.prefix + body + segment.suffix + segment.after)
    result.text = "".join(pieces)
    return result


def fit(translation: str, segment: Segment) -> tuple[str, int]:
    """A model's answer shaped to its segment's place in the document; returns it and the count of lost spans."""
    text = translation.strip()
    marker = segment.prefix.strip()
    if marker and text.startswith(marker):  # models like to repeat "- " or "## " at the start
        text = text[len(marker):].lstrip()
    text = " ".join(text.split()) if segment.single_line else BLANK_LINES.sub("\n", text)
    text, lost = restore(text, segment.protected)
    return text.replace("\n", "\n" + segment.line_prefix), lost


def restore(text: str, spans: tuple[str, ...]) -> tuple[str, int]:
    """Placeholders back to their spans: each used once, unknown ones dropped, lost ones appended."""
    used: set[int] = set()

    def original(match: re.Match) -> str:
        number = int(match[1])
        if 0 < number <= len(spans) and number not in used:
            used.add(number)
            return spans[number - 1]
        return ""

    text = PLACEHOLDER_RE.sub(original, text)
    lost = [spans[n - 1] for n in range(1, len(spans) + 1) if n not in used]
    if lost:
        text = " ".join([text.rstrip(), *lost]) if text.strip() else " ".join(lost)
    return text, len(lost)
