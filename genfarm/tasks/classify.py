"""Classify task: a `text` column -> one of the job's labels (or, with multi_label, the set of labels that apply),
answered through guided decoding, with a `confidence`: the probability the model gave the answer.

The answer is constrained (a choice among the labels; with multi_label a compact JSON object with one boolean per
label, in order, so no label can be named twice or invented and the answer's length is fixed), and generated with its
log-probability. vLLM masks the tokens the constraint forbids before it computes log-probabilities, so exp(logprob)
is the probability of this answer among the allowed ones: for one label, how sure the model is of it against the
other labels; for a set, of the whole set.

`score` compares the labels with a column of true labels (`genfarm eval`): accuracy, macro-F1, per-label
precision/recall/F1.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, field_validator

from genfarm.errors import UserError
from genfarm.rows import Prompt, chat, text_field
from genfarm.serve.protocol import SamplingParams, Usage
from genfarm.structured import parse_choice, parse_json
from genfarm.task import MappedTaskConfig, Online, Route, RowSampling, Task

SYSTEM = "You are a careful classifier. You read a text and decide which of the given labels describe it."
Labels = list[str] | dict[str, str]


def check_labels(value: Any) -> Labels:
    """The labels as given (a list, or label -> description), refused with a fix when they cannot be answered."""
    if not isinstance(value, list | dict):
        raise ValueError(f"labels are a list or a mapping label -> description, got {value!r}. Fix: write e.g. "
                         "[billing, technical, other]")
    names = list(value)
    if len(names) < 2:
        raise ValueError(f"{len(names)} label(s) leave nothing to choose. Fix: give at least two labels")
    for name in names:
        if not isinstance(name, str):  # YAML reads yes/no/on/off and numbers as other types
            raise ValueError(f"label {name!r} is not text. Fix: quote it, e.g. \"{name}\"")
        if not name.strip() or name != name.strip():
            raise ValueError(f"label {name!r} is empty or has surrounding spaces. Fix: write the label alone")
    if isinstance(value, list) and len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"{', '.join(twice)} is listed twice. Fix: list each label once")
    if isinstance(value, dict):
        for name, description in value.items():
            if not isinstance(description, str):
                raise ValueError(f"the description of {name!r} is not text. Fix: write label: description")
    return value


class ClassifyConfig(MappedTaskConfig):
    type: Literal["classify"]
    menu_order = 40
    labels: Labels = Field(description="The labels to choose from: a list, or a mapping label -> description (the "
                           "model sees the descriptions); in a serve config, the default of requests that give none.")
    multi_label: bool = Field(False, description="Answer every label that applies (a `labels` list column) instead "
                              "of the one that fits best (`label`).")
    instructions: str | None = Field(None, description="What to classify the text by, shown to the model before "
                                     "the labels, e.g. 'the department a customer message should go to'.")

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Labels:
        return check_labels(value)


class ClassifyRequest(SamplingParams):
    text: str = Field(min_length=1)
    labels: Labels | None = Field(None, description="Labels for this request; default: the serve config's "
                                  "tasks.classify.labels.")
    multi_label: bool | None = None
    model: str | None = None

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Labels | None:
        return None if value is None else check_labels(value)


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    model: str
    label: str | None = Field(description="The label that fits best (null with multi_label).")
    labels: list[str] | None = Field(description="The labels that apply (only with multi_label).")
    confidence: float | None = Field(description="The probability the model gave this answer among the allowed "
                                     "ones, 0-1 (null when the engine reported no log-probability).")
    text: str
    finish_reason: str | None
    usage: Usage


class Classify(Task):
    Config = ClassifyConfig
    route = Route("/v1/classifications", ClassifyRequest, ClassifyResponse,
                  "Classify a text into the configured labels (the batch `classify` task)")
    quality_defaults = {"repetition": False, "empty": False}  # an answer is a label, not prose
    config: ClassifyConfig

    def labels(self) -> list[str]:
        return list(self.config.labels)

    def output_schema(self) -> dict[str, pa.DataType]:
        if self.config.multi_label:
            return {"labels": pa.list_(pa.string()), "confidence": pa.float64()}
        return {"label": pa.string(), "confidence": pa.float64()}

    def required_columns(self) -> list[str]:
        return [self.config.columns.get("text", "text")]

    def prompt(self, row: dict) -> Prompt:
        text = text_field(row, "text", self.config.columns)
        labels = self.config.labels
        listed = "\n".join(f"- {name}: {labels[name]}" if isinstance(labels, dict) else f"- {name}"
                           for name in self.labels())
        task = self.config.instructions or ("Decide which labels apply to the text." if self.config.multi_label
                                            else "Classify the text.")
        answer = ("Answer in JSON: for each label, true if it applies to the text, else false."
                  if self.config.multi_label else "Answer with the one label that fits best, and nothing else.")
        return chat(self.config.system_prompt or SYSTEM, f"{task}\n\nLabels:\n{listed}\n\nText:\n{text}\n\n{answer}")

    def sampling(self, row: dict) -> RowSampling:
        return RowSampling(structured=self.constraint(), logprobs=True)

    def constraint(self) -> dict:
        if self.config.multi_label:
            return {"regex": label_regex(self.labels())}
        return {"choice": self.labels()}

    def parse_completion(self, row: dict, completion) -> dict:
        return self.parse(row, completion.text, completion.logprob)

    def parse(self, row: dict, text: str, logprob: float | None = None) -> dict:
        """The label(s) of an answer; `logprob`, the answer's log-probability when the engine gives it, becomes
        the confidence."""
        confidence = None if logprob is None else min(1.0, math.exp(logprob))
        if self.config.multi_label:
            chosen = parse_json(text, label_schema(self.labels()))
            return {"labels": [name for name in self.labels() if chosen[name]], "confidence": confidence}
        return {"label": parse_choice(text, self.labels()), "confidence": confidence}

    def summary(self, ledger) -> dict:
        """How often each label was answered."""
        counts = ledger.value_counts("labels" if self.config.multi_label else "label")
        return {"labels": {name: counts.get(name, 0) for name in self.labels()}}

    async def respond(self, row: dict, online: Online) -> ClassifyResponse:
        updates = {key: row[key] for key in ("labels", "multi_label") if row.get(key) is not None}
        task = Classify(self.config.model_copy(update=updates)) if updates else self
        ids = online.encode(task.prompt(row), param="text")
        [[completion]] = await online.complete([ids], task.sampling(row))
        text, reason = completion.text, completion.finish_reason
        columns = task.parse_completion(row, completion)
        return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", model=online.model, label=columns.get("label"),
                                labels=columns.get("labels"), confidence=columns["confidence"], text=text,
                                finish_reason=reason, usage=online.usage([ids]))


def label_schema(labels: list[str]) -> dict:
    """The multi-label answer: one boolean per label, every label, nothing else."""
    return {"type": "object", "properties": {name: {"type": "boolean"} for name in labels},
            "required": labels, "additionalProperties": False}


REGEX_SPECIAL = re.compile(r"([\\.^$|?*+()\[\]{}/-])")


def label_regex(labels: list[str]) -> str:
    """The multi-label answer as compact JSON, {"a":true,"b":false}: a regular expression rather than the JSON
    schema, so that no whitespace can be generated between the values (a model looping on spaces until max_tokens)."""
    fields = ",".join(REGEX_SPECIAL.sub(r"\\\1", json.dumps(name, ensure_ascii=False)) + ":(true|false)"
                      for name in labels)
    return r"\{" + fields + r"\}"


# --- genfarm eval: the labels against a column of true labels ---------------------------------------------------
def score(ledger, gold_column: str) -> dict:
    """Accuracy, macro-F1 and per-label precision/recall/F1 of a classify job's results (genfarm.batch.ledger.Ledger)
    against the input column `gold_column` (with multi_label: a list of labels, or a comma-separated text per row).

    Rows whose gold value is null are not scored; error rows (no label) are counted apart. With multi_label,
    accuracy is the share of rows whose set of labels is exactly right."""
    task = ledger.manifest()["spec"]["task"]
    if task.get("type") != "classify":
        raise UserError("OUTPUT", f"{ledger.uri} holds a {task.get('type')} job, not classify",
                        "give the output folder of a classify job")
    multi = bool(task.get("multi_label"))
    predicted = "labels" if multi else "label"
    table = ledger.read(where=pc.field("sample_index") == 0)
    if table is None:
        raise UserError("OUTPUT", f"{ledger.uri} holds no results yet", "run the classify job first")
    from genfarm.batch.worker import OWN_COLUMNS  # the batch pipeline's columns, only where a job is scored

    own = OWN_COLUMNS | set(Classify(ClassifyConfig.model_validate(task)).output_schema())
    column = f"input_{gold_column}" if gold_column in own else gold_column  # as the results keep input columns
    if column not in table.column_names:
        inputs = [name for name in table.column_names if name not in own]
        raise UserError(f"--gold {gold_column}", f"the results have no input column {gold_column!r} (input "
                        f"columns: {', '.join(inputs)})", "name the input column that holds the true labels")
    pairs = [(as_set(gold, multi), as_set(answer, multi))
             for gold, answer in zip(table[column].to_pylist(), table[predicted].to_pylist()) if gold is not None]
    names = list(task.get("labels") or [])
    names += sorted({name for gold, answer in pairs for name in gold | answer} - set(names))
    per_label = {}
    for name in names:
        tp = sum(1 for gold, answer in pairs if name in gold and name in answer)
        fp = sum(1 for gold, answer in pairs if name not in gold and name in answer)
        fn = sum(1 for gold, answer in pairs if name in gold and name not in answer)
        if tp + fp + fn:  # a label neither true nor answered anywhere has no score (as in scikit-learn)
            precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
            per_label[name] = {"precision": precision, "recall": recall,
                               "f1": ratio(2 * precision * recall, precision + recall), "support": tp + fn}
    macro_f1 = ratio(sum(s["f1"] for s in per_label.values()), len(per_label))
    return {
        "gold_column": column, "multi_label": multi, "scored_rows": len(pairs),
        "unlabelled_rows": table.num_rows - len(pairs), "error_rows": ledger.count().errors,
        "accuracy": round(ratio(sum(1 for gold, answer in pairs if gold == answer), len(pairs)), 4),
        "macro_f1": round(macro_f1, 4),
        "per_label": {name: {key: round(value, 4) for key, value in s.items()} for name, s in per_label.items()},
    }


def as_set(value: Any, multi: bool) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(part.strip() for part in value.split(",") if part.strip()) if multi else frozenset([value])
    return frozenset(str(item) for item in value)


def ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0
