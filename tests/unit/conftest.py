"""The fast layer: genfarm's plumbing in-process, without Ray or vLLM (an echo engine stands in, named as such)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
