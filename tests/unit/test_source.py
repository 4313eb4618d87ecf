"""Reading hostile input files without Ray: every line is a row or a typed error, or the file is refused in one line."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genfarm.batch.source import (
    column_type,
    count_rows,
    input_schema,
    list_inputs,
    merged_type,
    source_rows,
    to_block,
)
from genfarm.errors import UserError
from genfarm.spec import InputSpec


def read(path, id_column="id") -> tuple[list[dict], int]:
    """The rows of an input path as the job's blocks hold them, and the count the job expects."""
    spec = InputSpec(path=str(path), id_column=id_column)
    fs, files = list_inputs(spec)
    schema = input_schema(fs, files)
    rows = [r for f in files for r in to_block(list(source_rows(fs, f, spec)), schema).to_pylist()]
    return rows, count_rows(fs, files, None)


def test_column_type_of_values_no_arrow_type_holds():
    assert column_type([1, 2, 10**30]) == pa.int64()  # the huge one becomes a bad_type row
    assert column_type([10**30, 10**40]) == pa.string()  # nothing fits: text, every row a bad_type row
    assert column_type(["a", 1, "b"]) == pa.string()
    assert column_type([None, None]) == pa.string()


def test_merged_type_widens_numbers_else_takes_the_most_values():
    assert merged_type(Counter({pa.int64(): 5, pa.float64(): 1})) == pa.float64()
    assert merged_type(Counter({pa.int64(): 1, pa.string(): 3})) == pa.string()
    assert merged_type(Counter({pa.null(): 9, pa.int64(): 1})) == pa.int64()
    assert merged_type(Counter({pa.null(): 2})) == pa.null()  # a Parquet column of nulls stays as it is


def test_jsonl_bom_crlf_bad_utf8_huge_numbers_deep_nesting(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "bom", "topic": "a"}\r\n\r\n   \n'
                     b'{"id": "latin1", "topic": "caf\xe9"}\n'
                     b'{"id": "digits", "topic": ' + b"9" * 5000 + b'}\n'
                     b'{"id": "deep", "topic": ' + b"[" * 100_000 + b"]" * 100_000 + b'}\n'
                     b'{"id": "nul", "topic": "a\x00b"}\n{"id": "escaped-nul", "topic": "a\\u0000b"}\n'
                     b'{"id": "surrogate", "topic": "\\ud800"}\n{"id": "pair", "topic": "\\ud83d\\udc1d"}\n'
                     b'{"id": "big", "topic": "x", "n": 1}\n{"id": "big2", "topic": "y", "n": 100000000000000000000}')
    rows, total = read(path)
    assert total == len(rows) == 10
    errors = [r["_gf_error"].split(":")[0] if r["_gf_error"] else None for r in rows]
    assert errors == [None, "bad_json", "bad_json", "bad_json", "bad_json", None, "bad_json", None, None, "bad_type"]
    assert rows[0]["id"] == "bom" and rows[5]["topic"] == "a\x00b" and rows[7]["topic"] == "\U0001f41d"
    assert "not UTF-8 (byte 0xe9" in rows[1]["_gf_error"] and "caf\ufffd" in rows[1]["_gf_raw"]
    assert rows[4]["_gf_error"] == "bad_json: line 7, column 26: Invalid control character at"
    assert "half a surrogate pair" in rows[6]["_gf_error"] and "column 'n' holds int64" in rows[9]["_gf_error"]


def test_schema_comes_from_every_file_and_empty_files_are_skipped(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"")  # sorts first: once this refused the whole job
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "a.csv").write_bytes(b"")
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "b", "topic": "t", "n": 1}) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "c", "topic": "t", "n": 2.5, "extra": "e"}) + "\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "d", "topic": "t"}) + "\n")
    rows, total = read(tmp_path)
    assert total == 3 and [r["_gf_error"] for r in rows] == [None] * 3
    assert [r["n"] for r in rows] == [1.0, 2.5, None] and rows[1]["extra"] == "e"
    with pytest.raises(UserError, match="none of the 3 input files has a readable row"):
        for name in ("b", "c", "d"):
            (tmp_path / f"{name}.jsonl").write_text("\n")
        read(tmp_path)


def test_csv_bom_crlf_multiline_values_and_bad_rows_count_as_read(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes(b'\xef\xbb\xbfid,topic\r\n1,"two\r\nlines"\r\n\r\n  \r\n2,"a ""quoted"" word"\r\n3,x,y\r\n'
                     b'4,"' + b"long " * 600_000 + b'"\r\n')
    rows, total = read(path)
    assert total == len(rows) == 4
    assert [r["id"] for r in rows if not r["_gf_error"]] == ["1", "2", "4"]
    topics = {r["id"]: r["topic"] for r in rows}
    assert topics["1"] == "two\r\nlines" and topics["2"] == 'a "quoted" word' and len(topics["4"]) == 3_000_000
    [bad] = [r for r in rows if r["_gf_error"]]
    assert bad["_gf_error"] == "bad_row: expected 2 fields, got 3" and bad["_gf_raw"] == "3,x,y"


@pytest.mark.parametrize("name, data, expected", [
    ("corrupt.parquet", None, "corrupt.parquet cannot be read as parquet (Parquet magic bytes not found"),
    ("latin1.csv", b"id,topic\n1,caf\xe9\n", "latin1.csv cannot be read as csv (In CSV column #1: CSV conversion "
                                             "error to string: invalid UTF8 data)"),
    ("quote.csv", b'id,topic\n1,"never closed\n2,b\n3,c\n', "quote.csv: the quote opened in its last row is never "
                                                           "closed"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, name, data, expected):
    pq.write_table(pa.table({"id": ["a"], "topic": ["t"]}), tmp_path / "good.parquet")
    if data is None:
        data = (tmp_path / "good.parquet").read_bytes()[:-12] + b"\0" * 12
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError) as caught:
        read(tmp_path)
    assert expected in str(caught.value) and "Fix: " in str(caught.value) and "\n" not in str(caught.value)


def test_a_repeated_id_is_an_error_row_of_its_own_id(tmp_path):
    """The ledger knows rows by id: a duplicate that shared the first row's id would count as done with it, and be
    lost when its error row is retried."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "a", "topic": "x"}, {"id": "a", "topic": "y"},
                                                             {"id": 1, "topic": "z"}, {"id": "1", "topic": "w"}]))
    rows, _ = read(path)
    assert [r["_gf_id"] for r in rows] == ["a", "d.jsonl:1", "1", "d.jsonl:3"]
    assert rows[1]["_gf_error"] == "duplicate_id: id 'a' appears twice in d.jsonl" and '"y"' in rows[1]["_gf_raw"]


def test_input_columns_that_clash_are_renamed_to_names_no_other_column_has():
    from genfarm.batch.worker import output_schema

    schema, rename = output_schema(pa.schema([("id", pa.string()), ("prompt", pa.string()),
                                              ("input_prompt", pa.int64()), ("title", pa.string()), ("", pa.int64())]),
                                   {"title": pa.string()})
    assert rename == {"id": "input_id", "prompt": "input_input_prompt", "input_prompt": "input_prompt",
                      "title": "input_title", "": ""}
    assert len(set(schema.names)) == len(schema.names)  # a folder of parts with a field twice cannot be read


def test_the_error_line_shows_a_name_with_brackets_as_it_is(monkeypatch, capsys):
    """Rich markup in a file name ([final], [/x]) was read as styling: the name lost a part, or the line became a
    traceback (MarkupError)."""
    from genfarm import cli

    monkeypatch.setattr("sys.argv", ["genfarm", "run", "/nowhere/in[final]/job[/x].yaml"])
    with pytest.raises(SystemExit) as caught:
        cli.main()
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: /nowhere/in[final]/job[/x].yaml: job file not found.")


def corrupt_row_group(path, group: int) -> None:
    """Spoil the page headers of one row group of a Parquet file (its footer stays good)."""
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata.row_group(group)
    for c in range(meta.num_columns):
        column = meta.column(c)
        start = column.dictionary_page_offset or column.data_page_offset
        data[start:start + 8] = bytes(b ^ 0xFF for b in data[start:start + 8])
    path.write_bytes(bytes(data))


def test_a_corrupt_parquet_row_group_is_bad_rows_the_others_are_read(tmp_path):
    path = tmp_path / "g.parquet"
    pq.write_table(pa.table({"id": [f"g{i}" for i in range(6)], "topic": ["bees"] * 6}), path, row_group_size=2)
    corrupt_row_group(path, 1)
    rows, total = read(path)
    assert total == len(rows) == 6
    assert [r["_gf_id"] for r in rows] == ["g0", "g1", "g.parquet:2", "g.parquet:3", "g4", "g5"]
    assert rows[2]["_gf_error"].startswith("bad_row: row group 1 of g.parquet cannot be read (")


def test_keys_that_first_appear_late_in_a_jsonl_file_are_columns_too(tmp_path):
    """The schema is sampled, but a key (or a nested key) seen only after the sample must not vanish from its rows."""
    rows = [{"id": str(i), "topic": "bees", "meta": {"a": i}} for i in range(1500)]
    rows[1200]["extra"] = "late"
    rows[1300]["meta"]["b"] = "nested and late"
    path = tmp_path / "late.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read_back, _ = read(path)
    assert read_back[1200]["extra"] == "late" and read_back[0]["extra"] is None
    assert read_back[1300]["meta"] == {"a": 1300, "b": "nested and late"}
