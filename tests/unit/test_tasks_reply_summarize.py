"""The reply and summarize tasks without a model: config errors (one line each), prompts, the summarize expander on
a stand-in token counter, the segment summaries joined per document by the finish pass (echo engine), and the
online answers with a stand-in service."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from echo_engine import EchoEngine
from test_pipeline import job_for, run_worker
from test_tasks_classify_extract import StandIn, answer

from genfarm.batch.ledger import Ledger
from genfarm.batch.source import list_inputs, source_rows
from genfarm.engine import Completion
from genfarm.errors import UserError
from genfarm.rows import RowError
from genfarm.serve.config import ServeSpec
from genfarm.serve.routes import task_router
from genfarm.spec import EngineSpec, JobSpec, SamplingSpec, validate
from genfarm.task import make_task, task_classes
from genfarm.tasks.reply import ReplyRequest
from genfarm.tasks.summarize import (
    SUMMARIES,
    Length,
    Summarize,
    SummaryRequest,
    SummarySplitter,
    part_budget,
    summarize_file,
)

POLICY = "Refunds within 30 days.\nNever ask for a card number."


def job(task: dict, **sections) -> JobSpec:
    return validate(JobSpec, {"input": {"path": "in.jsonl"}, "task": task, "output": {"path": "out"}, **sections},
                    "job.yaml")


def task_of(config: dict):
    return make_task(job(config).task)


def user_text(prompt) -> str:
    return prompt.messages[-1]["content"]


# --- reply ------------------------------------------------------------------------------------------------------
def test_reply_prompt_has_policy_message_tone_language_and_no_signature_of_its_own():
    task = task_of({"type": "reply", "policy": POLICY, "company": "Acme", "tone": "warm", "language": "German",
                    "signature": "Best,\nAcme"})
    system, user = task.prompt({"text": "Where is my parcel?"}).messages
    assert "support agent for Acme" in system["content"]
    assert user["content"].startswith(f"Support policy:\n{POLICY}\n\nThe customer's message:\nWhere is my parcel?")
    assert "Tone: warm. Length: under 120 words. Write it in German." in user["content"]
    assert "Never write placeholders" in user["content"]
    assert "Do not sign it" in user["content"] and task.required_columns() == ["text"]
    assert task.parse({}, "  Hallo!  ") == {"reply": "Hallo!\n\nBest,\nAcme"}
    assert task.parse({}, "   ") == {"reply": ""}  # no signature under nothing (quality's `empty` flags the row)
    assert task.hints({"text": "x"}).language == "de"


def test_reply_row_language_and_tone_win_and_unknown_languages_are_not_checked():
    task = task_of({"type": "reply", "language": "en"})
    text = user_text(task.prompt({"text": "hola", "language": "es", "tone": "formal", "length": "2 sentences"}))
    assert "Tone: formal. Length: 2 sentences. Write it in Spanish." in text
    assert task.hints({"language": "es"}).language == "es" and task.hints({}).language == "en"
    assert "Write it in Klingon." in user_text(task.prompt({"text": "nuqneH", "language": "Klingon"}))
    assert task.hints({"language": "Klingon"}).language is None
    plain = task_of({"type": "reply"})
    assert "the language the customer wrote in" in user_text(plain.prompt({"text": "hi"}))
    assert plain.hints({"text": "hi"}).language is None
    assert "Support policy" not in user_text(plain.prompt({"text": "x"}))
    with pytest.raises(RowError, match="empty_prompt"):
        plain.prompt({"text": "  "})


def test_reply_reads_a_conversation_column():
    task = task_of({"type": "reply", "conversation": True, "columns": {"messages": "thread"}})
    thread = [{"role": "user", "content": "My blender broke."},
              {"role": "assistant", "content": "When did you buy it?"},
              {"role": "system", "content": "VIP customer"}, {"role": "customer", "content": "In May."}]
    assert task.required_columns() == ["thread"]
    text = user_text(task.prompt({"thread": thread}))
    assert ("The conversation so far:\nCustomer: My blender broke.\n\nAgent: When did you buy it?\n\n"
            "Internal note: VIP customer\n\nCustomer: In May.") in text
    assert user_text(task.prompt({"thread": json.dumps(thread)})) == text  # a CSV column holds it as JSON text
    for value, kind in [(None, "missing_field"), ("not json", "bad_type"), ({"role": "user"}, "bad_type"),
                        ([{"role": "bot", "content": "x"}], "bad_type"),
                        ([{"role": "assistant", "content": "Hello?"}], "empty_prompt")]:
        with pytest.raises(RowError) as caught:
            task.prompt({"thread": value})
        assert caught.value.kind == kind, value


def test_reply_policy_from_a_file(tmp_path, monkeypatch):
    (tmp_path / "policy.md").write_text(f"\n{POLICY}\n\n")
    monkeypatch.chdir(tmp_path)
    spec = job({"type": "reply", "policy": "policy.md"})
    assert spec.task.policy == POLICY  # read when the job file is loaded: the manifest holds the text itself
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec  # and reads back as text


@pytest.mark.parametrize("task, expected", [
    ({"type": "reply", "policy": "missing.md"}, "job.yaml: task.policy: policy file missing.md not found. Fix: give "
     "its path"),
    ({"type": "reply", "policy": " "}, "job.yaml: task.policy: the policy is empty. Fix:"),
    ({"type": "reply", "language": "Germna"}, "job.yaml: task.language: 'Germna' is not a BCP 47 language code"),
    ({"type": "reply", "signatur": "x"}, "job.yaml: task.signatur: unknown field. Fix: did you mean 'signature'?"),
    ({"type": "summarize", "length": "short"}, "job.yaml: task.length: 'short' is not a length. Fix: write it like "
     "3 sentences, 120 words or 5 bullet points"),
    ({"type": "summarize", "length": "0 words"}, "task.length: '0 words' is not a length"),
    ({"type": "summarize", "segment": {"max_tokens": 8}}, "job.yaml: task.segment.max_tokens"),
    ({"type": "summarize", "language": "xx"}, "job.yaml: task.language: 'xx' is not a BCP 47 language code"),
])
def test_config_errors_are_one_line_naming_the_field(task, expected):
    with pytest.raises(UserError) as caught:
        job(task)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


# --- summarize --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, count, unit, described, max_words", [
    ("3 sentences", 3, "sentences", "3 sentences", 120), ("about 120 words", 120, "words", "about 120 words", 240),
    ("1 sentence", 1, "sentences", "1 sentence", 40), ("5 Bullet Points", 5, "bullets", "5 bullet points, one per "
     "line starting with '- '", 150), ("~10 words", 10, "words", "about 10 words", 30),
])
def test_length_targets(text, count, unit, described, max_words):
    length = Length.parse(text)
    assert (length.count, length.unit, length.describe(), length.max_words) == (count, unit, described, max_words)


def test_length_shares_and_join():
    assert Length.parse("3 sentences").shares([500, 450, 50]) == [2, 1, 1]  # at least one sentence a part
    assert Length.parse("4 sentences").shares([10, 10, 10]) == [2, 1, 1]  # the shares add up to the target
    assert Length.parse("100 words").shares([300, 100]) == [75, 25]
    assert Length.parse("20 words").shares([900, 100]) == [18, 15]  # at least 15 words a part
    assert Length.parse("4 bullets").combine(["- a\n- b ", "", "- c"]) == "- a\n- b\n- c"
    assert Length.parse("2 sentences").combine([" One. ", "Two."]) == "One.\n\nTwo."


def test_summarize_prompts_and_quality_defaults():
    task = task_of({"type": "summarize", "length": "50 words", "focus": "deadlines", "language": "fr",
                    "columns": {"text": "body"}})
    whole = user_text(task.prompt({"body": "The text."}))
    assert whole.startswith("Summarize the text below in about 50 words. Focus on deadlines. Write the summary in "
                            "French.") and whole.endswith("Text:\nThe text.")
    part = {"body": "Part two.", "_gf_task": json.dumps({"document_id": "d", "index": 1, "count": 3, "target": 20})}
    assert "part 2 of 3 of a longer document. Summarize this part in about 20 words." in user_text(task.prompt(part))
    assert task.parse(part, "x") == {"document_id": "d", "segment_index": 1, "segment_count": 3}
    assert task.parse({"_gf_id": "d", "_gf_task": None}, "x") == {"document_id": "d", "segment_index": 0,
                                                                   "segment_count": 1}
    assert task.hints({"body": "The text.", "language": "de"}).language == "de"
    assert task.hints({"body": "The text."}).source == "The text."
    assert task.quality_defaults == {"length_ratio": (0.0, 1.0), "max_words": 100}
    assert Summarize.quality_defaults == {"length_ratio": (0.0, 1.0)}  # the class keeps the fixed part
    plain = task_of({"type": "summarize"})
    assert "in 3 sentences. Write the summary in the language of the text." in user_text(plain.prompt({"text": "x"}))


class WordTokenizer:
    """A stand-in tokenizer: one token per word, a chat template that joins the messages."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(range(len(text.split())))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


class WordSplitter(SummarySplitter):
    def __init__(self, settings, budget: int):
        super().__init__(settings, None, budget, WordTokenizer())


def paragraphs(n: int, words: int = 12) -> str:
    return "\n\n".join(" ".join(f"w{p}x{i}" for i in range(words - 1)) + " end." for p in range(n))


HUGE_CODE = "```\n" + " ".join(["huge"] * 80) + "\n```"  # a verbatim block larger than a part
LONG = f"# Title\n\n{paragraphs(6)}\n\n```\ncode that fits\n```\n\n{HUGE_CODE}\n\n{paragraphs(2)}"


def test_expander_makes_part_rows_within_the_budget_and_leaves_short_texts_alone():
    config = job({"type": "summarize", "length": "4 sentences"}).task
    splitter = WordSplitter(config, budget=40)
    row = {"id": "doc", "text": LONG, "_gf_id": "doc", "_gf_source": "in.jsonl", "_gf_row": 0, "_gf_error": None,
           "_gf_raw": None, "_gf_task": None}
    parts = splitter.expand(row)
    places = [json.loads(p["_gf_task"]) for p in parts]
    assert [p["_gf_id"] for p in parts] == [f"doc/{i}" for i in range(len(parts))] and len(parts) >= 3
    assert all(p["document_id"] == "doc" and p["count"] == len(parts) for p in places)
    assert [p["index"] for p in places] == list(range(len(parts)))
    assert all(len(p["text"].split()) <= 40 for p in parts)
    assert all(p["target"] >= 1 for p in places) and sum(p["target"] for p in places) >= 4
    joined = " ".join(p["text"] for p in parts).split()
    assert [w for w in LONG.split() if w not in ("```", "huge")] == [w for w in joined if w != "```"]
    assert "code that fits" in " ".join(p["text"] for p in parts) and "huge" not in joined  # too large: left out
    short = {**row, "text": "A short text. It fits."}
    assert splitter.expand(short) == [short]  # one row, one summary, as any task
    failed = {**row, "_gf_error": "bad_json: x"}
    assert splitter.expand(failed) == [failed] and splitter.expand({**row, "text": ""}) == [{**row, "text": ""}]


def test_part_budget_from_the_model_room_or_the_job_file():
    config = job({"type": "summarize"}).task
    engine, sampling = EngineSpec(max_model_len=1024), SamplingSpec(max_tokens=200)
    budget = part_budget(config, engine, sampling, WordTokenizer())
    assert 700 < budget < 1024 - 200
    fixed = job({"type": "summarize", "segment": {"max_tokens": 300}}).task
    assert part_budget(fixed, engine, sampling, WordTokenizer()) == 300
    too_big = job({"type": "summarize", "segment": {"max_tokens": 900}}).task
    with pytest.raises(UserError, match=r"^task.segment.max_tokens: 900 text tokens per part do not fit: \d+ fit "
                       r"beside the prompt and an answer of 200 tokens \(context 1024\)\. Fix: lower it to"):
        part_budget(too_big, engine, sampling, WordTokenizer())
    with pytest.raises(UserError, match=r"^sampling.max_tokens: only -?\d+ text tokens per part fit .* fewer than 32"):
        part_budget(config, EngineSpec(max_model_len=64), SamplingSpec(max_tokens=32), WordTokenizer())


def test_segment_summaries_are_joined_per_document_by_the_finish_pass(tmp_path, monkeypatch):
    rows = [{"id": "long", "text": LONG}, {"id": "short", "text": "Bees make honey. The hive keeps it."},
            {"id": "empty", "text": " "}, {"id": "broken", "text": paragraphs(5, 12).replace("w4x10", "refuse")}]
    job_spec = job_for(tmp_path, rows, {"type": "summarize", "length": "2 sentences"})
    splitter = WordSplitter(job_spec.task, budget=40)
    monkeypatch.setattr(Summarize, "expander", lambda self, job, path: splitter)
    stats = run_worker(job_spec, EchoEngine(fail_on="refuse"))
    fs, files = list_inputs(job_spec.input)
    work = [row for file in files for row in source_rows(fs, file, job_spec.input, splitter)]
    assert stats["rows"] == len(work) == stats["results"] + stats["errors"]  # every work row accounted for
    summarize_file(job_spec.output.path, fs, files[0], job_spec.input, splitter, "job-1")
    out = pd.read_parquet(tmp_path / "out" / SUMMARIES).set_index("document_id")
    results = pd.read_parquet(tmp_path / "out").set_index("id")
    assert sorted(out.index) == ["broken", "empty", "long", "short"]  # one summary per document
    long_parts = results[results["document_id"] == "long"].sort_values("segment_index")
    assert out.loc["long", "status"] == "complete" and out.loc["long", "segments"] == len(long_parts) > 2
    assert out.loc["long", "text"] == "\n\n".join(t.strip() for t in long_parts["output_text"])
    assert out.loc["long", "prompt_tokens"] == long_parts["prompt_tokens"].sum()
    assert out.loc["short", "text"] == results.loc["short", "output_text"] and out.loc["short", "segments"] == 1
    assert out.loc["empty", "status"] == "failed" and out.loc["empty", "errors"][0].startswith("empty_prompt")
    assert out.loc["broken", "status"] == "partial" and list(out.loc["broken", "failed_segments"]) == [1]
    assert out.loc["broken", "errors"][0].startswith("segment 1: engine_error")
    counts = make_task(job_spec.task).summary(Ledger(job_spec.output.path))["documents"]
    assert (counts["documents"], counts["complete"], counts["partial"], counts["failed"]) == (4, 2, 1, 1)
    assert pq.read_schema(tmp_path / "out" / SUMMARIES / f"{files[0].key}.parquet").field("text")


# --- online -----------------------------------------------------------------------------------------------------
class Service(StandIn):
    """The stand-in service with a tokenizer and an engine: each prompt is answered with its own number."""

    def __init__(self, max_tokens: int = 64, max_model_len: int = 2048):
        super().__init__("")
        self.tokenizer, self.engine = WordTokenizer(), EngineSpec(max_model_len=max_model_len)
        self.sampling = SamplingSpec(max_tokens=max_tokens)

    async def complete(self, prompts, wanted=None):
        return [[Completion(f"Summary {n}.", "length" if n == 1 else "stop", 3, 0)] for n in range(len(prompts))]


def test_reply_online_takes_text_or_messages():
    service = task_of({"type": "reply", "policy": POLICY, "language": "en", "signature": "Acme"})
    body = answer(service, ReplyRequest(text="Where is my parcel?"), online := Service())
    assert body.reply == "Summary 0.\n\nAcme" and body.text == "Summary 0." and body.language == "en"
    assert "Where is my parcel?" in user_text(online.prompts[0]) and POLICY in user_text(online.prompts[0])
    conversation = ReplyRequest(messages=[{"role": "user", "content": "Hola"}], language="es")
    assert answer(service, conversation, online).language == "es"
    assert "Customer: Hola" in user_text(online.prompts[1]) and "Write it in Spanish" in user_text(online.prompts[1])
    with pytest.raises(ValueError, match="^text: give the customer's message"):
        answer(service, ReplyRequest(text="a", messages=[{"role": "user", "content": "b"}]), online)


def test_summarize_online_splits_a_long_text_and_joins_the_parts():
    service = task_of({"type": "summarize", "length": "2 sentences"})
    short = answer(service, SummaryRequest(text="Bees make honey."), Service())
    assert (short.text, short.segments, short.finish_reason) == ("Summary 0.", 1, "stop")
    long = answer(service, SummaryRequest(text=LONG, length="3 bullets"), Service(max_model_len=160, max_tokens=40))
    assert long.segments > 2 and long.finish_reason == "length"  # one part was cut at max_tokens
    assert long.text == "\n".join(f"Summary {n}." for n in range(long.segments))
    tight = answer(service, SummaryRequest(text="Bees."), Service(max_model_len=64, max_tokens=40))
    assert tight.segments == 1  # no room for parts: the text goes whole (the engine refuses what does not fit)
    with pytest.raises(ValueError, match="is not a length"):
        SummaryRequest(text="x", length="brief")


def test_both_tasks_have_routes_and_serve_defaults():
    spec = ServeSpec()
    assert spec.tasks["reply"].policy is None and spec.tasks["summarize"].length == "3 sentences"
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(task_router({name: task_classes()[name].route for name in ("reply", "summarize")}))
    assert {"/v1/replies", "/v1/summaries"} <= set(app.openapi()["paths"])
