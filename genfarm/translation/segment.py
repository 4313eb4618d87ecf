"""Split a plain-text or Markdown document into segments a model can translate, each within a token budget.

Paragraphs, headings, list items and block quotes are the units; a unit over the budget is split between sentences,
and a sentence over it between words. Code blocks, tables, HTML blocks and link definitions become verbatim segments
that are never sent to a model; inside prose, inline code, URLs, link targets and inline HTML are replaced by
placeholders (⟦1⟧, ⟦2⟧, ...) that reassembly puts back. Heading marks, list markers, quote marks and every blank line
are kept outside the text that is translated, so

    reassemble(segments, {s.index: s.text for s in segments}).text == text   (line ends normalized to "\\n")
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

CountTokens = Callable[[str], int]

PLACEHOLDER = "⟦{}⟧"
PLACEHOLDER_RE = re.compile(r"⟦\s*(\d+)\s*⟧")
# Spans of prose that are never translated, in order of precedence.
PROTECTED = re.compile(
    r"⟦\s*\d+\s*⟧"  # a literal placeholder in the source, so it cannot be confused with ours
    r"|(?P<ticks>`+).+?(?P=ticks)"  # inline code
    r"|<(?:https?|ftp|mailto):[^>\s]+>"  # autolink
    r"|(?<=\]\()[^)\s]+"  # link or image target: [text](target)
    r"|\b(?:https?|ftp)://[^\s<>\"'`]*[^\s<>\"'`.,;:!?)\]]"  # bare URL, without trailing punctuation
    r"|</?[A-Za-z][\w-]*(?:\s[^<>]*)?/?>"  # inline HTML tag
)
LETTER = re.compile(r"[^\W\d_]")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^( {0,3}#{1,6}[ \t]+)(.*?)([ \t]+#+[ \t]*)?$")
RULE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
LIST_ITEM = re.compile(r"^([ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+(?:\[[ xX]\][ \t]+)?)(\S.*)$")
QUOTE = re.compile(r"^( {0,3}>[ \t]?)(.*)$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
TABLE_DELIMITER = re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$")
HTML_BLOCK = re.compile(r"^ {0,3}<(?:!--|/?[A-Za-z][\w-]*(?:[\s>/]|$))")
LINK_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*\S+")
INDENTED = re.compile(r"^(?: {4}|\t)")
SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(\s+)|[。！？]+(\s*)")
WORD = re.compile(r"(\S+)(\s*)")


@dataclass(frozen=True)
class Segment:
    """One piece of a document, in document order; `index` is its position (what translations are keyed by)."""

    index: int
    text: str  # sent to the model (protected spans as placeholders); for a verbatim segment, the text itself
    translate: bool  # False: kept verbatim, never sent to a model
    prefix: str = ""  # kept before the translation: heading mark, list marker, quote mark, indentation
    suffix: str = ""  # kept after it: closing heading marks, setext underline, trailing spaces
    after: str = ""  # line breaks and blank lines up to the next segment
    protected: tuple[str, ...] = ()  # placeholder ⟦i⟧ stands for protected[i - 1]
    line_prefix: str = ""  # put back after every line break of the translation (block quotes)
    single_line: bool = False  # headings: the translation must stay on one line

    @property
    def source(self) -> str:
        """The original text of the segment, placeholders filled in."""
        return unmask(self.text, self.protected)


@dataclass
class _Unit:
    """A structural block of lines [start, end) before the budget splits it."""

    start: int
    end: int
    translate: bool
    prefix: str = ""
    text: str = ""
    suffix: str = ""
    line_prefix: str = ""
    single_line: bool = False
    is_list_item: bool = False


def mask(text: str) -> tuple[str, tuple[str, ...]]:
    """Replace protected spans by numbered placeholders."""
    spans: list[str] = []

    def placeholder(match: re.Match) -> str:
        spans.append(match.group(0))
        return PLACEHOLDER.format(len(spans))

    return PROTECTED.sub(placeholder, text), tuple(spans)


def unmask(text: str, spans: tuple[str, ...]) -> str:
    return PLACEHOLDER_RE.sub(lambda m: spans[int(m[1]) - 1] if 0 < int(m[1]) <= len(spans) else m[0], text)


def segment_document(text: str, count_tokens: CountTokens, budget: int) -> list[Segment]:
    """Segments of `text` in order; every translatable segment's `text` counts at most `budget` tokens."""
    if budget < 1:
        raise ValueError(f"the token budget must be at least 1, got {budget}")
    lines = text.replace("\r\n", "\n").split("\n")
    units = list(_units(lines))
    segments: list[Segment] = []
    first = units[0].start if units else len(lines)
    leading = "\n".join(lines) if not units else "".join(line + "\n" for line in lines[:first])
    if leading:
        segments.append(Segment(0, leading, translate=False))
    for k, unit in enumerate(units):
        if k + 1 < len(units):
            after = "\n" + "".join(lines[m] + "\n" for m in range(unit.end, units[k + 1].start))
        else:
            after = "".join("\n" + lines[m] for m in range(unit.end, len(lines)))
        segments.extend(_segments_of(unit, lines, after, len(segments), count_tokens, budget))
    return segments


def _segments_of(unit: _Unit, lines: list[str], after: str, first_index: int, count: CountTokens,
                 budget: int) -> Iterator[Segment]:
    masked, spans = mask(unit.text)
    if not unit.translate or not LETTER.search(PLACEHOLDER_RE.sub("", masked)):
        yield Segment(first_index, "\n".join(lines[unit.start:unit.end]), translate=False, after=after)
        return
    chunks = [(masked, "")] if count(masked) <= budget else split_to_budget(masked, count, budget)
    for n, (chunk, separator) in enumerate(chunks):
        last = n == len(chunks) - 1
        local_text, local_spans = mask(unmask(chunk, spans))  # placeholders numbered from 1 in every segment
        yield Segment(
            first_index + n, local_text, translate=True,
            prefix=unit.prefix if n == 0 else "",
            suffix=unit.suffix if last else "",
            after=after if last else separator.replace("\n", "\n" + unit.line_prefix),
            protected=local_spans, line_prefix=unit.line_prefix, single_line=unit.single_line,
        )


def split_to_budget(text: str, count: CountTokens, budget: int) -> list[tuple[str, str]]:
    """(chunk, separator after it) pieces of `text`, each within budget: whole sentences where they fit, else words,
    else characters. Joining chunk + separator for all pieces gives `text` back."""
    return _pack(_pieces(text, SENTENCE_END), count, budget, lambda piece: _pack(
        _pieces(piece, WORD), count, budget, lambda word: _cut(word, count, budget)))


def _pieces(text: str, boundary: re.Pattern) -> list[tuple[str, str]]:
    """Split after each boundary match; the whitespace the boundary captured becomes the piece's separator."""
    pieces, start = [], 0
    for match in boundary.finditer(text):
        gap_start, gap_end = match.span(match.lastindex)  # the gap is the pattern's last group that matched
        if gap_end >= len(text):
            break
        pieces.append((text[start:gap_start], text[gap_start:gap_end]))
        start = gap_end
    pieces.append((text[start:], ""))
    return [(piece, sep) for piece, sep in pieces if piece or sep]


def _pack(pieces: list[tuple[str, str]], count: CountTokens, budget: int,
          too_long: Callable[[str], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """Greedily join consecutive pieces into chunks within the budget; a piece over it alone goes to `too_long`."""
    chunks: list[tuple[str, str]] = []
    group: list[tuple[str, str]] = []

    def close_group() -> None:
        if group:
            chunks.append(("".join(t + s for t, s in group[:-1]) + group[-1][0], group[-1][1]))
            group.clear()

    for piece, separator in pieces:
        if count(piece) > budget:
            close_group()
            split = too_long(piece)
            chunks.extend(split[:-1] + [(split[-1][0], split[-1][1] + separator)])
            continue
        if group and count("".join(t + s for t, s in group) + piece) > budget:
            close_group()
        group.append((piece, separator))
    close_group()
    return chunks


def _cut(word: str, count: CountTokens, budget: int) -> list[tuple[str, str]]:
    """A single word over the budget (a long identifier, a run without spaces): the longest prefixes that fit."""
    chunks = []
    while word:
        low, high = 1, len(word)
        while low < high:  # the longest prefix within budget, found by bisection
            mid = (low + high + 1) // 2
            low, high = (mid, high) if count(word[:mid]) <= budget else (low, mid - 1)
        chunks.append((word[:low], ""))
        word = word[low:]
    return chunks


def _units(lines: list[str]) -> Iterator[_Unit]:
    """Structural blocks of a Markdown (or plain) text, skipping blank lines."""
    i, previous = 0, None
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        unit = _verbatim_block(lines, i, previous) or _text_block(lines, i)
        yield unit
        previous, i = unit, unit.end


def _verbatim_block(lines: list[str], i: int, previous: _Unit | None) -> _Unit | None:
    line = lines[i]
    if FENCE.match(line):
        return _Unit(i, _fence_end(lines, i), translate=False)
    if _is_table(lines, i):
        return _Unit(i, _end_while(lines, i, lambda x: "|" in x and x.strip()), translate=False)
    if HTML_BLOCK.match(line):
        return _Unit(i, _end_while(lines, i, lambda x: x.strip()), translate=False)
    if LINK_DEFINITION.match(line):
        return _Unit(i, _end_while(lines, i, LINK_DEFINITION.match), translate=False)
    if RULE.match(line):
        return _Unit(i, i + 1, translate=False)
    if INDENTED.match(line) and not (previous and previous.is_list_item):
        end = _end_while(lines, i, lambda x: INDENTED.match(x) or not x.strip())
        while not lines[end - 1].strip():
            end -= 1
        return _Unit(i, end, translate=False)
    return None


def _text_block(lines: list[str], i: int) -> _Unit:
    line = lines[i]
    if heading := HEADING.match(line):
        return _with_edges(_Unit(i, i + 1, True, heading[1], heading[2], heading[3] or "", single_line=True))
    if item := LIST_ITEM.match(line):
        end = _end_while(lines, i + 1, _continues_paragraph)
        return _with_edges(_Unit(i, end, True, item[1], "\n".join([item[2], *lines[i + 1:end]]), is_list_item=True))
    if quote := QUOTE.match(line):
        mark = quote[1]
        end = _end_while(lines, i, lambda x: x.startswith(mark) and x.strip() != mark.strip())
        text = "\n".join(x[len(mark):] for x in lines[i:end])
        return _with_edges(_Unit(i, max(end, i + 1), True, mark, text, line_prefix=mark))
    end = _end_while(lines, i + 1, _continues_paragraph)
    unit = _Unit(i, end, True, text="\n".join(lines[i:end]))
    if end < len(lines) and SETEXT.match(lines[end]):  # an underlined (setext) heading
        unit.end, unit.suffix, unit.single_line = end + 1, "\n" + lines[end], end == i + 1
    return _with_edges(unit)


def _with_edges(unit: _Unit) -> _Unit:
    """Leading and trailing whitespace of a unit's text is layout: move it into its prefix and suffix."""
    stripped = unit.text.strip()
    if stripped:
        start = unit.text.index(stripped)
        unit.prefix += unit.text[:start]
        unit.suffix = unit.text[start + len(stripped):] + unit.suffix
        unit.text = stripped
    return unit


def _continues_paragraph(line: str) -> bool:
    starts_block = (FENCE.match(line) or HEADING.match(line) or RULE.match(line) or LIST_ITEM.match(line)
                    or QUOTE.match(line) or HTML_BLOCK.match(line) or SETEXT.match(line))
    return bool(line.strip()) and not starts_block


def _is_table(lines: list[str], i: int) -> bool:
    line = lines[i]
    if line.lstrip().startswith("|"):
        return True
    following = lines[i + 1] if i + 1 < len(lines) else ""
    return "|" in line and "|" in following and "-" in following and bool(TABLE_DELIMITER.match(following))


def _fence_end(lines: list[str], i: int) -> int:
    opening = FENCE.match(lines[i])[1]
    for j in range(i + 1, len(lines)):
        closing = FENCE.match(lines[j])
        if closing and closing[1][0] == opening[0] and len(closing[1]) >= len(opening) and not lines[j].strip(
                ).lstrip(opening[0]):
            return j + 1
    return len(lines)  # an unclosed fence runs to the end of the document, as in CommonMark


def _end_while(lines: list[str], i: int, belongs: Callable[[str], object]) -> int:
    end = i
    while end < len(lines) and belongs(lines[end]):
        end += 1
    return end
