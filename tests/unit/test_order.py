"""Prefix-aware order (genfarm/batch/order.py): a read task's window of rows comes out ordered by prompt, so rows that
share a prefix sit together; a window whose rows share nothing beyond their common start keeps the input's order;
rows are never lost, repeated or moved across windows."""

from __future__ import annotations

import pickle
import random

from genfarm.batch.order import PromptOrder
from genfarm.spec import JobSpec


def questions_task():
    """Many questions about each document: the document first, so every question of it shares a long prefix."""
    job = JobSpec.model_validate({
        "input": {"path": "unused.jsonl"}, "output": {"path": "out"}, "model": {"name": "tiny"},
        "task": {"type": "template", "messages": [
            {"role": "system", "content": "Answer from the document."},
            {"role": "user", "content": "{{ document }}\n\nQuestion: {{ question }}"}]},
    })
    return job.task


def rows(documents: int, questions: int, seed: int = 0) -> list[dict]:
    made = [{"_gf_id": f"d{d}-q{q}", "_gf_error": None, "document": f"document {d} " + "words " * (60 + d % 5),
             "question": f"question {q}?"} for d in range(documents) for q in range(questions)]
    random.Random(seed).shuffle(made)
    return made


def runs(ordered: list[dict]) -> int:
    """Stretches of consecutive rows about the same document."""
    documents = [row["_gf_id"].split("-")[0] for row in ordered]
    return 1 + sum(a != b for a, b in zip(documents, documents[1:]))


def test_a_window_puts_each_documents_questions_together():
    shuffled = rows(16, 8)
    ordered = list(PromptOrder(questions_task(), window_rows=4096).arrange(iter(shuffled)))
    assert sorted(r["_gf_id"] for r in ordered) == sorted(r["_gf_id"] for r in shuffled)
    assert runs(ordered) == 16  # one stretch per document (shuffled: ~ one per row)
    assert runs(shuffled) > 100


def test_windows_bound_what_is_held_and_keep_their_order():
    shuffled = rows(16, 8)
    window = 32
    ordered = list(PromptOrder(questions_task(), window_rows=window).arrange(iter(shuffled)))
    for start in range(0, len(shuffled), window):  # each window holds the same rows as read, sorted among themselves
        assert {r["_gf_id"] for r in ordered[start:start + window]} == \
            {r["_gf_id"] for r in shuffled[start:start + window]}
    assert runs(ordered) < runs(shuffled)


def test_rows_the_task_refuses_and_error_rows_pass_through_first():
    good = rows(2, 2)
    broken = {"_gf_id": "no-question", "_gf_error": None, "document": "a document"}  # the template's field missing
    unreadable = {"_gf_id": "bad-json", "_gf_error": "bad_json: not JSON"}
    ordered = list(PromptOrder(questions_task(), window_rows=10).arrange(iter([*good, broken, unreadable])))
    assert len(ordered) == 6 and {r["_gf_id"] for r in ordered[:2]} == {"no-question", "bad-json"}


def test_the_order_travels_to_read_tasks_without_its_built_task():
    order = PromptOrder(questions_task(), window_rows=8)
    list(order.arrange(iter(rows(2, 2))))  # builds the task in this process
    copy = pickle.loads(pickle.dumps(order))
    assert copy._task is None and copy.window_rows == 8
    ids = [[r["_gf_id"] for r in each.arrange(iter(rows(2, 2)))] for each in (copy, order)]
    assert ids[0] == ids[1]


def test_rows_that_share_only_the_common_start_keep_the_input_order():
    """One long system prompt over varied topics (an article job): nothing to gain, so nothing moves."""
    job = JobSpec.model_validate({
        "input": {"path": "unused.jsonl"}, "output": {"path": "out"}, "model": {"name": "tiny"},
        "task": {"type": "template", "messages": [
            {"role": "system", "content": "You are a careful writer. " * 40},
            {"role": "user", "content": "Write about {{ topic }}."}]},
    })
    topics = [{"_gf_id": f"t{i}", "_gf_error": None, "topic": f"topic number {(i * 7) % 50}"} for i in range(50)]
    topics.insert(3, {"_gf_id": "bad", "_gf_error": "bad_json: not JSON"})  # sorts first, shares nothing
    ordered = list(PromptOrder(job.task, window_rows=4096).arrange(iter(topics)))
    assert [r["_gf_id"] for r in ordered] == [r["_gf_id"] for r in topics]
