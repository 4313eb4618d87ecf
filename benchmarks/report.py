"""What every benchmark writes: results/NAME.{json,md,png} and the table on stdout."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write(name: str, data: dict, table: list[str], folder: Path = RESULTS, quiet: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1))
    (folder / f"{name}.md").write_text("\n".join(table) + "\n")
    if not quiet:
        print("\n".join(table))


def pyplot():
    """matplotlib's pyplot drawing to files only (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def by_key(runs: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Runs grouped by the values of `keys`, in first-seen order: the rounds of one measurement, to be pooled."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run[key] for key in keys), []).append(run)
    return groups
