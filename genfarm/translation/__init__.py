"""Long-document translation: segment within a token budget, translate segments anywhere, reassemble, evaluate.

The online endpoint (flow.py) and batch jobs (splitter.py -> the translate task's prompts -> documents.py) share the
same pieces:

    segments = segment_document(text, count_tokens, budget)
    translations = {s.index: translate(segment_prompt(...)) for s in segments if s.translate}
    document = reassemble(segments, translations)   # .text, .missing, .lost_placeholders

This package is a library of the translate task (genfarm/tasks/translate.py): it may use the batch pipeline's
ledger, and nothing in genfarm's core imports it.
"""

from genfarm.translation.assemble import Reassembled, reassemble
from genfarm.translation.segment import Segment, segment_document

__all__ = ["Reassembled", "Segment", "reassemble", "segment_document"]
