"""Kill trials (benchmarks/chaos.py) in the suite: one trial each of the engine fault, Ctrl-C and planted crashed-write
leftovers with a SIGKILL of the driver and all it started (which is the driver-kill fault plus leftovers), against the
tiny model, each checked by the tool itself; and the tool's checks catch what a fault could leave behind. Fault moments
come from a fixed window instead of a clean run measured first, which would cost a whole run more."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import make_job

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import chaos  # noqa: E402
from genfarm.batch.ledger import MANIFEST, SUMMARY, Ledger, part_name, source_key  # noqa: E402

TRIALS_TIMEOUT_S = 360


@pytest.mark.timeout(TRIALS_TIMEOUT_S + 60)
def test_one_trial_of_three_faults_passes(tmp_path, tiny):
    faults = "engine,driver-int,temp-files"
    done = subprocess.run([sys.executable, "-m", "benchmarks.chaos", "--trials", "1", "--faults", faults,
                           "--rows", "160", "--seed", "17", "--model", tiny, "--out", str(tmp_path / "results"),
                           "--work", str(tmp_path / "work"), "--timeout", "240", "--window", "5,30"],
                          cwd=ROOT, capture_output=True, text=True, timeout=TRIALS_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "results" / "chaos.json").read_text())
    assert results["meta"]["seed"] == 17 and "seed 17" in done.stdout
    trials = {t["fault"]: t for t in results["trials"]}
    assert sorted(trials) == sorted(faults.split(","))
    for fault, trial in trials.items():
        assert trial["status"] == "passed", (fault, trial)
        assert trial["checks"]["results"] + trial["checks"]["errors"] == 160
    assert "| engine |" in (tmp_path / "results" / "chaos.md").read_text()


def results(ids: list[str]) -> pa.Table:
    """Result rows as a part holds them, as far as the checks read them (one sample each)."""
    return pa.table({"id": ids, "output_text": ["x"] * len(ids), "sample_index": pa.array([0] * len(ids), pa.int32())})


def finished_job(folder: Path) -> tuple[chaos.Job, Ledger]:
    """A job folder as a finished run leaves it (16 results in two parts, 4 error rows), written without Ray."""
    job = chaos.Job(folder, 20, "m")
    store = Ledger(str(job.out))
    spec = make_job(folder / "in.jsonl", job.out, "m")
    store.write_json(MANIFEST, {"job_id": "chaos-x", "settings": {"model": {"name": "m"}},
                                "spec": spec.model_dump(mode="json")})
    for start in (0, 8):
        ids = job.ids[start:start + 8]
        store.commit(results(ids), part_name(source_key("a"), start, ids))
    ids = job.ids[16:]
    store.commit(pa.table({"id": ids, "error_type": ["e"] * 4, "message": ["m"] * 4}),
                 part_name(source_key("a"), 16, ids), errors=True)
    store.write_json(SUMMARY, {"status": "complete", "input_rows": 20, "completed_rows": 16, "error_rows": 4})
    return job, store


@pytest.mark.parametrize("damage", ["repeated row", "visible temp file", "half a part"])
def test_checks_catch_what_a_fault_could_leave(tmp_path, damage):
    job, store = finished_job(tmp_path)
    planted = chaos.plant(job.out, random.Random(1))  # genfarm's own leftovers are no damage
    assert any(p.startswith("_genfarm/tmp/") for p in planted) and any(p.startswith(".") for p in planted)
    assert chaos.check(job) == {"results": 16, "errors": 4, "parts": 3}
    if damage == "repeated row":
        store.commit(results(job.ids[:1]), part_name(source_key("b"), 0, job.ids[:1]))
    elif damage == "visible temp file":
        (job.out / "x.parquet.tmp").write_bytes(b"abc")
    else:
        (job.out / "y.parquet").write_bytes(b"PAR1abc")
    with pytest.raises(chaos.Failed) as failed:
        chaos.check(job)
    expected = {"repeated row": "1 repeated", "visible temp file": "x.parquet.tmp is visible",
                "half a part": "y.parquet is not a whole Parquet file"}[damage]
    assert expected in str(failed.value)
