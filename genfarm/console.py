"""What every genfarm command prints with, where the system output of its libraries goes, and the help text the
cluster commands share."""

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

out = Console(soft_wrap=True)  # long paths stay on one line for grep and copy-paste
err = Console(stderr=True, soft_wrap=True)
ADDRESS_HELP = "The cluster's dashboard address (default: $GENFARM_CLUSTER or http://127.0.0.1:8265)."


@contextmanager
def system_output_to(path: Path) -> Iterator[None]:
    """Send what Ray's C++ core and other libraries write straight to this process's stderr (file descriptor 2)
    into the log file `path`, while Python's own stderr (progress, errors) stays on the terminal: a user sees
    genfarm's lines, and Ray's internal warnings are kept where they can be read later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    terminal = os.dup(2)
    previous = sys.stderr
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, encoding=previous.encoding or "utf-8",
                               errors="backslashreplace")
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(terminal, 2)
            sys.stderr.close()
            sys.stderr = previous
            os.close(terminal)


def log_path(command: str) -> Path:
    """Where a command's system output goes: GENFARM_CACHE (default ~/.cache/genfarm)/logs/COMMAND-TIME.log."""
    root = Path(os.environ.get("GENFARM_CACHE", Path.home() / ".cache" / "genfarm"))
    return root / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
