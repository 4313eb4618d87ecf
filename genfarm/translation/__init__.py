"""Long-document translation: segment within a token budget, translate segments anywhere, reassemble, evaluate.

The online endpoint and batch jobs share the same two functions:

    segments = segment_document(text, count_tokens, budget)
    translations = {s.index: translate(s.text) for s in segments if s.translate}
    document = reassemble(segments, translations)   # .text, .missing, .lost_placeholders
"""

from genfarm.translation.assemble import Reassembled, reassemble
from genfarm.translation.segment import Segment, segment_document

__all__ = ["Reassembled", "Segment", "reassemble", "segment_document"]
