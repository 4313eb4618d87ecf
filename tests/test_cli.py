"""The command line as a user meets it: real subprocesses, exit codes, one-line errors, a real job."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import topics, write_jsonl


def genfarm(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genfarm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def write_job(tmp_path, data, model="smollm2-135m-instruct", task="{type: article}", extra="") -> str:
    path = tmp_path / "job.yaml"
    path.write_text(f"input: {{path: {data}, id_column: id}}\ntask: {task}\nmodel: {{name: {model}}}\n"
                    f"output: {{path: {tmp_path / 'out'}}}\n{extra}")
    return str(path)


def folder(path):
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("case, expected", [
    ("unknown_task", "task: unknown task type 'essay'"),
    ("missing_input", "input.path: "),
    ("wrong_column", "the input has no column 'subject'"),
    ("bad_sampling", "sampling.temperature: Input should be greater than or equal to 0"),
    ("unknown_model", "model.name: unknown model 'no-such-model'"),
    ("bad_set", "--set sampling: expected KEY=VALUE"),
    ("no_job_file", "job file not found"),
    ("unwritable_output", "output.path: cannot write to /proc/forbidden"),
    ("missing_plugin", "plugins: cannot import 'no_such_tasks'"),
    ("unreadable_input", "input.path: cannot read"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, expected):
    data = write_jsonl(tmp_path / "t.jsonl", topics(2))
    args = {  # lambdas: each case writes only its own job file
        "unknown_task": lambda: ["run", write_job(tmp_path, data, task="{type: essay}")],
        "missing_input": lambda: ["run", write_job(tmp_path, tmp_path / "nope.jsonl")],
        "wrong_column": lambda: ["run", write_job(tmp_path, data, task="{type: article, columns: {topic: subject}}")],
        "bad_sampling": lambda: ["run", write_job(tmp_path, data), "--set", "sampling.temperature=-2"],
        "unknown_model": lambda: ["run", write_job(tmp_path, data, model="no-such-model")],
        "bad_set": lambda: ["run", write_job(tmp_path, data), "--set", "sampling"],
        "no_job_file": lambda: ["run", tmp_path / "missing.yaml"],
        "unwritable_output": lambda: ["run", write_job(tmp_path, data), "--set", "output.path=/proc/forbidden"],
        "missing_plugin": lambda: ["run", write_job(tmp_path, data, extra="plugins: [no_such_tasks]\n")],
        # a folder whose name says JSONL, the only thing the glob matches
        "unreadable_input": lambda: ["run", write_job(tmp_path, f"'{folder(tmp_path / 'in' / 'x.jsonl').parent}"
                                                                   "/*.jsonl'")],
    }[case]()
    result = genfarm(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Fix:" in lines[0]


def test_help_explains_every_command():
    result = genfarm("--help")
    assert result.returncode == 0
    for command in ("run", "status", "inspect", "generate", "models"):
        assert command in result.stdout
    assert "--set" in genfarm("run", "--help").stdout


def test_run_status_inspect_through_the_cli(tmp_path, tiny):
    data = write_jsonl(tmp_path / "t.jsonl", topics(10))
    job = write_job(tmp_path, data, model=tiny, extra="sampling: {max_tokens: 8}\nengine: {max_model_len: 512, "
                    "kv_cache_gib: 0.25}\n")
    result = genfarm("run", job, "--no-progress", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["completed_rows"] == 10 and summary["status"] == "complete"
    assert len(pd.read_parquet(tmp_path / "out")) == 10
    status = genfarm("status", tmp_path / "out")
    assert status.returncode == 0 and "10 rows generated, 0 errors" in status.stdout and "complete" in status.stdout
    shown = genfarm("inspect", tmp_path / "out", "-n", "3")
    assert shown.returncode == 0 and "t000" in shown.stdout
    # a second run of the same command finds nothing left to do
    again = json.loads(genfarm("run", job, "--no-progress", "--json").stdout)
    assert again["run_completion_tokens"] == 0 and again["completed_rows"] == 10


def test_status_of_a_folder_without_a_job(tmp_path):
    result = genfarm("status", tmp_path)
    assert result.returncode == 2 and "holds no genfarm job" in result.stderr


def test_generate_refusals_are_one_line_errors(tmp_path, tiny):
    """A chat template that refuses the system role (as Gemma's does) and a prompt longer than the model takes."""
    import shutil

    model = shutil.copytree(tiny, tmp_path / "no-system-model")
    template = model / "chat_template.jinja"
    template.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}" + template.read_text())
    for args, field in ((["--system", "Be brief."], "--system"), (["--max-tokens", "8"], "PROMPT")):
        prompt = "bees " * (5000 if field == "PROMPT" else 1)
        result = genfarm("generate", prompt, "--model", model, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {field}") and "Fix:" in line, result.stderr[-3000:]
