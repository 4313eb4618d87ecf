"""Job files: validation errors name the field and the fix; --set overrides keep their types."""

from __future__ import annotations

import pytest

from genfarm.errors import UserError
from genfarm.spec import apply_overrides, load_job

GOOD = """
input: {path: examples/topics.jsonl}
task: {type: article}
output: {path: out/x}
"""


def job_file(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text: str, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_job(job_file(tmp_path, text), overrides)
    message = str(info.value)
    assert "\n" not in message and "Fix:" in message
    return message


def test_defaults_and_overrides_keep_types(tmp_path):
    job = load_job(job_file(tmp_path, GOOD), ["sampling.max_tokens=99", 'sampling.stop=["\\n\\n", END]',
                                              "input.path=data/other.parquet", "output.path=out/y"])
    assert job.sampling.max_tokens == 99 and job.sampling.stop == ["\n\n", "END"]
    assert job.input.path == "data/other.parquet" and job.output.path == "out/y"
    assert job.model.name == "smollm2-135m-instruct" and job.workers.bounds == (1, 1)


@pytest.mark.parametrize("text, overrides, expected", [
    (GOOD.replace("article", "poem"), (), "task: unknown task type 'poem'. Fix: use one of: article, translate"),
    (GOOD, ["sampling.temperature=-1"], "sampling.temperature: Input should be greater than or equal to 0"),
    (GOOD, ["sampling.top_p=2"], "sampling.top_p"),
    (GOOD, ["sampling.max_tokenz=5"], "sampling.max_tokenz: unknown field. Fix: did you mean 'max_tokens'?"),
    (GOOD, ["task.lenght=short"], "task.lenght: unknown field. Fix: did you mean 'length'?"),
    (GOOD.replace("output: {path: out/x}", ""), (), "output: required field is missing"),
    (GOOD, ["workers.min=3", "workers.max=2"], "workers.min (3) is larger than workers.max (2)"),
    (GOOD, ["workers.count=2", "workers.max=2"], "give workers.count or workers.min/max"),
    (GOOD, ["engine.long_prompts=cut"], "engine.long_prompts: Input should be 'error' or 'truncate'"),
    ("input: [1, 2", (), "not valid YAML"),
    ("- a list", (), "a job file is a YAML mapping"),
    (GOOD.replace("{type: article}", "{type: template}"), (), "give exactly one of task.messages"),
    (GOOD, ["quality.min_words=50", "quality.max_words=10"], "quality.max_words: 10 is fewer than min_words (50)"),
    (GOOD, ["quality.length_ratio=[3, 1]"], "quality.length_ratio: [3, 1] is not a range"),
])
def test_bad_job_files_name_the_field(tmp_path, text, overrides, expected):
    assert expected in error_of(tmp_path, text, overrides)


def test_bad_set_flag():
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        apply_overrides({}, ["sampling.max_tokens"])


def test_missing_job_file(tmp_path):
    with pytest.raises(UserError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")
