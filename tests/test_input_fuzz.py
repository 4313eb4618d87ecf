"""Hostile input files as real batch jobs on the tiny model (issue 17, point 5: batch input fuzzing).

What a mature batch tool does, asserted here: every input row ends as exactly one result row or one typed error
row and the job exits 0; an input that cannot be read as a whole (a Parquet file with a corrupt footer, a CSV that is
not UTF-8 or never closes a quote) is refused before anything runs, in one line that names the file or field and a
fix (exit code 2, no traceback), and the output already written stays as it was. hypothesis fuzzes the read path
alone (many files, no Ray, derandomized); the jobs batch every hostile row into few runs, so the file stays fast.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_job
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit.test_source import corrupt_row_group

from genfarm.errors import UserError
from genfarm.rows import ERROR_TYPES

RESULT = "result"
BOM = codecs.BOM_UTF8
ENGINE = "engine: {max_model_len: 512, max_num_seqs: 64, kv_cache_gib: 0.25}\n"
SAMPLING = "sampling: {max_tokens: 4, temperature: 0.8, seed: 1}\nworkers: {count: 1, batch_size: 64}\n"
HUGE = "bees " * 400_000  # 2 MB in one value: far past max_model_len, and past pyarrow's 1 MiB CSV block


# --- the read path alone: hypothesis ---------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=10**40)
           | st.floats(allow_nan=False) | st.text(max_size=12) | st.sampled_from(["\ud800", "a\udfffb", "", "  "]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                             max_size=3), max_leaves=6)
ROWS = (st.dictionaries(st.sampled_from(["id", "topic", "n", "note"]) | st.text(max_size=3), VALUES, max_size=5)
        | st.fixed_dictionaries({"id": st.text(min_size=1, max_size=6) | st.integers(), "topic": st.text(max_size=12)}))
LINES = st.one_of(
    ROWS.map(lambda row: json.dumps(row).encode()),  # lone surrogates come as \ud800 escapes
    VALUES.map(lambda value: json.dumps(value).encode()),  # a line that is JSON but not an object
    st.binary(max_size=24),  # anything at all: invalid UTF-8, NUL bytes, stray line breaks
    st.sampled_from([b"", b"  ", b"\t", b"\r", b"{", b"not json", b'{"id": "cut", "topic": ', b"\x00", BOM,
                     b'{"id": "latin1", "topic": "caf\xe9"}', b'{"topic": ' + b"9" * 5000 + b"}",
                     b'{"topic": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", b'{"topic": NaN}']),
)
JSONL_FILES = st.tuples(st.lists(LINES, max_size=12), st.booleans(), st.sampled_from([b"\n", b"\r\n"]))


def jsonl_bytes(lines: list[bytes], bom: bool, newline: bytes) -> bytes:
    return (BOM if bom else b"") + newline.join(lines)


def nonblank_lines(data: bytes) -> int:
    """What the job must count for a JSONL file: every line with anything but whitespace is one row."""
    lines = data.removeprefix(BOM).split(b"\n") if data else []
    return sum(1 for line in lines if line.decode("utf-8", errors="replace").strip())


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(files=st.lists(JSONL_FILES, min_size=1, max_size=3))
def test_read_path_gives_every_line_one_row_or_refuses_in_one_line(tmp_path_factory, files):
    from genfarm.batch.source import count_rows, input_schema, list_inputs, source_rows, to_block
    from genfarm.spec import InputSpec

    folder = tmp_path_factory.mktemp("fuzz")
    expected = {}
    for i, (lines, bom, newline) in enumerate(files):
        data = jsonl_bytes(lines, bom, newline)
        (folder / f"f{i}.jsonl").write_bytes(data)
        expected[f"f{i}.jsonl"] = nonblank_lines(data)
    spec = InputSpec(path=str(folder), id_column="id")
    try:
        fs, inputs = list_inputs(spec)
        schema = input_schema(fs, inputs)
    except UserError as err:  # nothing to read at all: refused, in one line
        assert "readable row" in str(err) or "with data" in str(err), err
        assert "\n" not in str(err) and "Fix: " in str(err)
        return
    assert count_rows(fs, inputs, None) == sum(expected.values())
    for file in inputs:
        rows = to_block(list(source_rows(fs, file, spec)), schema).to_pylist()  # Arrow took every row
        assert [r["_gf_row"] for r in rows] == list(range(expected[file.name]))
        for row in rows:
            if row["_gf_error"]:
                assert row["_gf_error"].split(": ")[0] in ERROR_TYPES, row["_gf_error"]
                assert row["_gf_raw"] is not None or row["_gf_error"].startswith(("missing_field", "duplicate_id"))
        ids = [r["_gf_id"] for r in rows]
        assert len(set(ids)) == len(ids)


# --- real jobs -------------------------------------------------------------------------------------------------------

def jsonl(path: Path, entries: list, bom: bool = False, newline: bytes = b"\n") -> dict[tuple[str, int], str]:
    """Write JSONL entries: (value or raw bytes, outcome) rows, or bare bytes for blank lines. Returns the outcome
    each row must have, by (file, source_row)."""
    lines, expected = [], {}
    for entry in entries:
        if isinstance(entry, bytes):
            lines.append(entry)
            continue
        value, outcome = entry
        expected[(path.name, len(expected))] = outcome
        lines.append(value if isinstance(value, bytes) else json.dumps(value).encode())
    path.write_bytes(jsonl_bytes(lines, bom, newline))  # no newline after the last line
    return expected


def hostile_jsonl(folder: Path) -> tuple[dict, dict]:
    """Every JSON type in the prompt and id columns, undecodable and unparseable lines, BOM, CRLF, blank lines,
    a 2 MB row, empty files. Returns outcomes by (file, row) and, for some, the id a row must keep."""
    for name in ("a_empty.jsonl", "a_empty.csv", "a_empty.parquet"):  # sort first: once these refused the job
        (folder / name).write_bytes(b"")
    topics = {  # the prompt column of the article task
        "null": (None, "missing_field"), "true": (True, "bad_type"), "false": (False, "bad_type"),
        "zero": (0, "bad_type"), "negative": (-7, "bad_type"), "float": (1.5, "bad_type"),
        "subnormal": (5e-324, "bad_type"), "big-float": (1e300, "bad_type"), "int64-max": (2**63 - 1, "bad_type"),
        "uint64": (2**64, "bad_type"), "huge-int": (10**30, "bad_type"), "empty": ("", "empty_prompt"),
        "spaces": (" \t ", "empty_prompt"), "text": ("bees and water", RESULT), "unicode": ("ünïcödé 🐝 日本", RESULT),
        "nul": ("a\u0000b bees", RESULT), "list": (["bees"], "bad_type"), "empty-list": ([], "bad_type"),
        "object": ({"topic": "bees"}, "bad_type"), "empty-object": ({}, "bad_type"),
    }
    ids = {  # the id column: text is the rule, so another JSON type is a bad_type row; null is a missing id
        "null": (None, "missing_field"), "true": (True, "bad_type"), "int": (0, "bad_type"),
        "float": (1.5, "bad_type"), "huge-int": (10**30, "bad_type"), "list": (["a"], "bad_type"),
        "object": ({"k": 1}, "bad_type"), "unicode": ("ïd 🐝", RESULT), "newline": ("line\nbreak", RESULT),
        "nul": ("a\u0000b", RESULT),
    }
    keep_ids = {}
    entries: list = [({"id": "bom-first", "topic": "bees"}, RESULT), b"", b"   ", b"\r"]
    for name, (value, outcome) in topics.items():
        entries.append(({"id": f"topic-{name}", "topic": value}, outcome))
        keep_ids[f"topic-{name}"] = outcome
    entries += [({"id": f"filler-{i}", "topic": f"music number {i}"}, RESULT) for i in range(12)]
    for name, (value, outcome) in ids.items():
        entries += [({"id": value, "topic": f"id {name}"}, outcome), b"\t"]
    expected = jsonl(folder / "types.jsonl", entries, bom=True, newline=b"\r\n")
    lines = [
        ({"id": "ok-1", "topic": "bees"}, RESULT),
        (b'{"id": "latin1", "topic": "caf\xe9"}', "bad_json"),  # not UTF-8
        (b'{"id": "raw-nul", "topic": "a\x00b"}', "bad_json"),  # a control character inside a JSON string
        (b"\x00", "bad_json"), (b"not json", "bad_json"), (b'{"id": "cut", "topic": ', "bad_json"),
        (b"[1, 2]", "bad_json"), (b'"text"', "bad_json"), (b"null", "bad_json"), (b"42", "bad_json"), b"",
        (b'{"id": "digits", "topic": "bees", "n": ' + b"9" * 5000 + b"}", "bad_json"),
        (b'{"id": "deep", "topic": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "bad_json"),
        (b'{"id": "surrogate", "topic": "\\ud800 bees"}', "bad_json"),
        (b'{"id": "pair", "topic": "\\ud83d\\udc1d bees"}', RESULT),
        (b'{"id": "nan", "topic": NaN}', "bad_type"),
        ({"id": "no-topic"}, "missing_field"), ({"id": "ok-2", "topic": "water"}, RESULT), b"  ",
        ({"id": "ok-1", "topic": "again"}, "duplicate_id"), ({"id": "last", "topic": "music"}, RESULT),
    ]
    expected |= jsonl(folder / "lines.jsonl", lines)
    expected |= jsonl(folder / "huge.jsonl", [({"id": "huge", "topic": HUGE}, "prompt_too_long"),
                                               ({"id": "after-huge", "topic": "bees"}, RESULT)])
    keep_ids |= {"pair": RESULT, "huge": "prompt_too_long", "after-huge": RESULT, "ïd 🐝": RESULT,
                 "line\nbreak": RESULT, "a\u0000b": RESULT}
    return expected, keep_ids


def hostile_mixed(folder: Path) -> tuple[dict, dict]:
    """Schemas that differ across files (a column int in one, text in another, missing in a third, one only a later
    file has, names genfarm uses), Parquet of many Arrow types and with a corrupt row group, a CSV with BOM, CRLF,
    quoting, bad rows and a 2 MB value."""
    expected = jsonl(folder / "mix_a.jsonl", [({"id": f"a{i}", "topic": "bees", "n": i}, RESULT) for i in range(4)])
    expected |= jsonl(folder / "mix_b.jsonl", [({"id": "b-text", "topic": "bees", "n": "seven"}, "bad_type"),
                                               ({"id": "b-missing", "topic": "bees"}, RESULT),
                                               ({"id": "b-extra", "topic": "bees", "only_b": "kept"}, RESULT),
                                               ({"id": "b-clash", "topic": "bees", "prompt": "mine",
                                                 "input_prompt": "mine too", "": "no name"}, RESULT)])
    pq.write_table(pa.table({
        "id": ["p0", "p1", "p2"], "topic": pa.array(["bees", None, "water"], pa.large_string()),
        "n": pa.array([7, 8, None], pa.int64()), "blob": pa.array([b"\x00\xff", None, b""]),
        "big": pa.array([2**64 - 1, 0, 1], pa.uint64()), "nested": pa.array([[{"a": 1}], [], None]),
        "cat": pa.array(["x", "y", "x"]).dictionary_encode(),
    }), folder / "mix_c.parquet")
    expected |= {("mix_c.parquet", 0): RESULT, ("mix_c.parquet", 1): "missing_field", ("mix_c.parquet", 2): RESULT}
    pq.write_table(pa.table({"id": ["q0"], "topic": [12345]}), folder / "mix_d.parquet")  # the prompt column an int
    expected |= {("mix_d.parquet", 0): "bad_type"}
    pq.write_table(pa.table({"id": [f"g{i}" for i in range(6)], "topic": ["bees"] * 6}), folder / "mix_e.parquet",
                   row_group_size=2)
    corrupt_row_group(folder / "mix_e.parquet", 1)  # a good footer, a page that cannot be read
    expected |= {("mix_e.parquet", i): "bad_row" if i in (2, 3) else RESULT for i in range(6)}
    (folder / "z.csv").write_bytes(
        BOM + b'id,topic\r\nc1,bees\r\nc2,"multi\r\nline bees"\r\nc3,"say ""hi"" bees"\r\n\r\n  \r\nc4,x,y\r\n'
        b'c5,a\x00b bees\r\nc6,"' + HUGE.encode() + b'"\r\nc7,""\r\nc9,"quoted"then more\r\n'
        b'c10,a "quote" inside\r\nc8,music')  # c9, c10: quotes RFC 4180 does not allow, read as pandas reads them
    csv = Counter({RESULT: 7, "bad_row": 1, "prompt_too_long": 1, "empty_prompt": 1})
    return expected, {"z.csv": csv}


def outcomes(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    results = pd.read_parquet(out)
    errors = pd.read_parquet(out / "_errors") if (out / "_errors").is_dir() else pd.DataFrame(
        columns=["id", "error_type", "message", "input", "source_file", "source_row"])
    return results, errors


def check_every_row_once(out: Path, summary: dict, expected: dict, csv_counts: dict | None = None,
                         keep_ids: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each input row is exactly one result or one typed error row, with the outcome it must have."""
    results, errors = outcomes(out)
    assert summary["status"] == "complete", summary
    assert summary["completed_rows"] + summary["error_rows"] == summary["input_rows"] == len(results) + len(errors)
    got = {(r.source_file, r.source_row): RESULT for r in results.itertuples()}
    for r in errors.itertuples():
        assert (r.source_file, r.source_row) not in got, f"{r.source_file}:{r.source_row} is a result and an error"
        got[(r.source_file, r.source_row)] = r.error_type
    assert len(got) == len(results) + len(errors)  # no row twice
    assert set(errors["error_type"]) <= set(ERROR_TYPES)
    assert errors["message"].str.len().gt(0).all() and errors["input"].str.len().gt(0).all()
    for (file, row), outcome in expected.items():
        assert got.get((file, row)) == outcome, (file, row, outcome, got.get((file, row)),
                                                 errors[(errors.source_file == file) & (errors.source_row == row)]
                                                 .to_dict("records"))
    for file, counts in (csv_counts or {}).items():
        mine = {row: outcome for (name, row), outcome in got.items() if name == file}
        assert sorted(mine) == list(range(sum(counts.values()))) and Counter(mine.values()) == counts, mine
    assert len(got) == len(expected) + sum(sum(c.values()) for c in (csv_counts or {}).values())
    by_id = {**dict.fromkeys(results["id"], RESULT), **dict(zip(errors["id"], errors["error_type"]))}
    for row_id, outcome in (keep_ids or {}).items():
        assert by_id.get(row_id) == outcome, (row_id, outcome, by_id.get(row_id))
    return results, errors


def genfarm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genfarm", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


UNREADABLE = [  # name, bytes (None: a Parquet file whose footer is zeroed), what the one line must say
    ("corrupt[final].parquet", None, "corrupt[final].parquet cannot be read as parquet (Parquet magic bytes not "
                                     "found"),  # [brackets]: not rich markup
    ("latin1.csv", b"id,topic\r\n1,caf\xe9\r\n", "latin1.csv cannot be read as csv (In CSV column #1"),
    ("unclosed.csv", b'id,topic\n1,"never closed\n2,bees\n3,water\n', "unclosed.csv: the quote opened in its last "
                                                                      "row is never closed"),
    ("reserved.jsonl", b'{"id": "r", "topic": "bees", "_gf_row": "x"}\n', "columns named like genfarm's own "
                                                                          "(_gf_row)"),
]


def unreadable_bytes(data: bytes | None) -> bytes:
    if data is not None:
        return data
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["x"], "topic": ["bees"]}), sink)
    good = sink.getvalue().to_pybytes()
    return good[:-12] + b"\0" * 12


def test_hostile_jsonl_through_the_cli_then_unreadable_inputs_are_refused(tmp_path, tiny):
    folder = tmp_path / "in"
    folder.mkdir()
    expected, keep_ids = hostile_jsonl(folder)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{path: {folder}, id_column: id}}\ntask: {{type: article}}\nmodel: {{name: {tiny}}}\n"
                   f"output: {{path: {out}}}\n{ENGINE}{SAMPLING}")
    ran = genfarm("run", job, "--no-progress", "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = json.loads(ran.stdout)
    results, errors = check_every_row_once(out, summary, expected, keep_ids=keep_ids)
    assert summary["input_rows"] == len(expected)
    assert set(results["source_file"]) == {"types.jsonl", "lines.jsonl", "huge.jsonl"}  # the empty files: no rows
    messages = dict(zip(errors["id"], errors["message"]))
    assert "column 'topic' holds string" in messages["topic-zero"] and "column 'id' holds string" in messages["0"]
    assert messages["topic-null"] == "column 'topic' is missing or null"
    assert messages["lines.jsonl:17"] == "id 'ok-1' appears twice in lines.jsonl"  # its own id, not the first's
    latin1 = errors[errors.message.str.contains("not UTF-8")]
    assert len(latin1) == 1 and "caf\ufffd" in latin1["input"].iloc[0]  # the line, as far as it can be shown
    assert results.set_index("id").loc["bom-first", "topic"] == "bees"  # the BOM is not part of the first row
    assert results.set_index("id").loc["topic-nul", "topic"] == "a\u0000b bees"  # a NUL in the text goes through

    # An input that cannot be read as a whole: refused in one line before anything runs; nothing written changes.
    # (The other unreadable inputs are refused in-process below: each CLI run costs a Python start.)
    before = snapshot(out)
    name, data, message = UNREADABLE[0]
    (folder / name).write_bytes(unreadable_bytes(data))
    refused = genfarm("run", job, "--no-progress", "--json")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: input.path: ") and message in lines[0], lines
    assert "Fix: " in lines[0]
    assert snapshot(out) == before


@pytest.mark.usefixtures("ray_session")
def test_mixed_schemas_parquet_types_and_csv_in_process(tmp_path, tiny):
    from genfarm.batch.job import run_job

    folder = tmp_path / "in"
    folder.mkdir()
    expected, csv_counts = hostile_mixed(folder)
    job = make_job(folder, tmp_path / "out", tiny, engine={"max_model_len": 512, "max_num_seqs": 64},
                   sampling={"max_tokens": 4}, workers={"batch_size": 64})
    summary = run_job(job, show_progress=False)
    results, errors = check_every_row_once(tmp_path / "out", summary, expected, csv_counts)
    by_id = results.set_index("id")
    assert by_id.loc["b-extra", "only_b"] == "kept"  # a column only a later file has is kept
    assert pd.isna(by_id.loc["a0", "only_b"]) and pd.isna(by_id.loc["b-missing", "n"])
    clash = by_id.loc["b-clash"]  # input columns named like genfarm's own, and like their renamed selves
    assert (clash["input_input_prompt"], clash["input_prompt"], clash[""]) == ("mine", "mine too", "no name")
    big = {r["id"]: r["big"] for r in pq.read_table(tmp_path / "out", columns=["id", "big"]).to_pylist()}
    assert by_id.loc["p0", "blob"] == b"\x00\xff" and big["p0"] == 2**64 - 1  # exact (pandas makes it a float)
    assert by_id.loc["p0", "cat"] == "x" and list(by_id.loc["p0", "nested"]) == [{"a": 1}]
    assert by_id.loc["c2", "topic"] == "multi\r\nline bees" and by_id.loc["c3", "topic"] == 'say "hi" bees'
    assert by_id.loc["c9", "topic"] == "quotedthen more" and by_id.loc["c10", "topic"] == 'a "quote" inside'
    messages = dict(zip(errors["id"], errors["message"]))
    assert messages["b-text"].startswith("column 'n' holds int64") and "seven" in messages["b-text"]
    assert messages["q0"].startswith("column 'topic' holds ") and "got int 12345" in messages["q0"]
    [bad_row] = errors[(errors.error_type == "bad_row") & (errors.source_file == "z.csv")].to_dict("records")
    assert bad_row["input"] == "c4,x,y" and bad_row["message"] == "expected 2 fields, got 3"
    assert messages["mix_e.parquet:2"].startswith("row group 1 of mix_e.parquet cannot be read (")

    # Inputs that cannot be read as a whole: refused in one line, before anything runs or is written.
    before = snapshot(tmp_path / "out")
    for name, data, message in UNREADABLE:
        (folder / name).write_bytes(unreadable_bytes(data))
        with pytest.raises(UserError) as caught:
            run_job(job, show_progress=False)
        (folder / name).unlink()
        line = str(caught.value)
        assert line.startswith("input.path: ") and message in line and "Fix: " in line and "\n" not in line, line
        assert snapshot(tmp_path / "out") == before
    (folder / "corrupt.parquet").write_bytes(unreadable_bytes(None))
    with pytest.raises(UserError, match="corrupt.parquet cannot be read as parquet"):
        run_job(make_job(folder, tmp_path / "fresh", tiny), show_progress=False)
    assert not os.path.exists(tmp_path / "fresh")  # a new job's folder is not even made
