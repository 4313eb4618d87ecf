"""One door for tasks: job files, their errors, make_task and the serve config all come from the registry."""

from __future__ import annotations

from typing import Literal

import pytest

from genfarm.errors import UserError
from genfarm.rows import Prompt
from genfarm.serve.config import ServeSpec
from genfarm.spec import JobSpec, TaskConfig, task_types, validate
from genfarm.task import Task, make_task, task_classes


class EchoTaskConfig(TaskConfig):
    type: Literal["unit-echo"]
    times: int = 1


class EchoTask(Task):
    Config = EchoTaskConfig

    def required_columns(self) -> list[str]:
        return ["text"]

    def prompt(self, row: dict) -> Prompt:
        return Prompt(text=row["text"] * self.config.times)


def job(task: dict) -> JobSpec:
    return validate(JobSpec, {"input": {"path": "in.jsonl"}, "task": task, "output": {"path": "out"}}, "job.yaml")


def test_builtin_tasks_come_first_then_registered_ones():
    assert task_types()[:3] == ["article", "translate", "template"]
    assert "unit-echo" in task_types() and task_classes()["unit-echo"] is EchoTask


def test_a_registered_task_is_a_job_file_task():
    spec = job({"type": "unit-echo", "times": 2})
    assert isinstance(spec.task, EchoTaskConfig)
    assert spec.model_dump(mode="json")["task"] == {"type": "unit-echo", "times": 2}  # every field kept
    assert make_task(spec.task).prompt({"text": "ab"}).text == "abab"
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec  # manifests read back


@pytest.mark.parametrize("task, expected", [
    ({"type": "unit-echo", "tims": 2}, "job.yaml: task.tims: unknown field. Fix: did you mean 'times'?"),
    ({"type": "artcle"}, "task: unknown task type 'artcle'. Fix: did you mean 'article'?"),
    ({"topic": "x"}, "task: task.type is missing. Fix: use one of: article, translate, template"),
    ("article", "task: task is a mapping with a type"),
])
def test_task_errors_name_the_field_and_the_fix(task, expected):
    with pytest.raises(UserError) as caught:
        job(task)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_plugin_modules_are_imported_before_the_task_is_read():
    with pytest.raises(UserError, match="plugins: cannot import 'no_such_module'.*PYTHONPATH"):
        validate(JobSpec, {"plugins": ["no_such_module"], "input": {"path": "x"}, "task": {"type": "article"},
                           "output": {"path": "out"}}, "job.yaml")


def test_serve_config_has_every_routed_task_at_its_defaults():
    spec = ServeSpec.model_validate({"tasks": {"translate": {"source_language": "English"}}})
    assert {"article", "translate"} <= set(spec.tasks)  # the tasks with an HTTP route
    assert "template" not in spec.tasks  # it has none
    assert spec.tasks["translate"].source_language == "English"
    with pytest.raises(UserError, match="tasks.translate.source_langage: unknown field. Fix: did you mean"):
        validate(ServeSpec, {"tasks": {"translate": {"source_langage": "en"}}}, "serve.yaml")
