"""Long-document translation: the segmenter and reassembly (no engine), then whole jobs on real Ray Data + vLLM with
the tiny model (its text is meaningless: structure, order and counts are checked, never prose), and `genfarm eval`
against sacrebleu's own command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_job, write_jsonl
from test_cli import genfarm as genfarm_in

from genfarm.errors import UserError
from genfarm.spec import JobSpec
from genfarm.translation import reassemble, segment_document
from genfarm.translation.assemble import fit
from genfarm.translation.languages import name, normalize

ROOT = Path(__file__).resolve().parent.parent
GUIDE = (ROOT / "examples/docs/getting-started.md").read_text()
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
URL = re.compile(r"https://\S+?(?=[)\s])")


def words(text: str) -> int:
    return len(text.split())


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n[ \t]*\n", text.strip()) if p.strip()]


# --- segmenter and reassembly, no engine ------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [3, 12, 1000])
def test_segments_reassemble_to_the_original_within_budget(budget):
    segments = segment_document(GUIDE, words, budget)
    assert [s.index for s in segments] == list(range(len(segments)))
    assert reassemble(segments, {s.index: s.text for s in segments}).text == GUIDE
    translatable = [s for s in segments if s.translate]
    assert all(words(s.text) <= budget for s in translatable)
    sent = "\n".join(s.text for s in translatable)
    for block in FENCE.findall(GUIDE):  # code blocks and the table are verbatim segments, never sent
        assert any(not s.translate and s.text == block for s in segments)
    assert any(not s.translate and s.text.startswith("| column") for s in segments)
    for span in URL.findall(GUIDE) + ["`jobs/hello.yaml`", "`genfarm run jobs/hello.yaml`"]:
        assert span not in sent
    headings = [s for s in segments if s.prefix.startswith("#")]
    assert [s.prefix for s in headings] == ["# ", "## ", "## ", "## "] and all(s.single_line for s in headings)
    assert [s.prefix for s in segments if re.match(r"[-\d]", s.prefix)] == ["- ", "- ", "- ", "1. ", "2. ", "3. "]


def test_plain_text_and_edge_cases_round_trip():
    cases = ["", "\n\n", "One line", "Title\n=====\n\ntext  \n", "> quoted line one\n> line two\n",
             "  indented start.\r\nNext.\r\n", "x" * 50, "Ends without newline. Two sentences here!",
             "* * *\n\n<div>\nhtml\n</div>\n\n[ref]: https://example.com\n", "    code()\n\nafter"]
    for text in cases:
        segments = segment_document(text, words, 2)
        assert reassemble(segments, {s.index: s.text for s in segments}).text == text.replace("\r\n", "\n")
    assert [s.text for s in segment_document("x" * 50, len, 20) if s.translate] == ["x" * 20, "x" * 20, "x" * 10]
    sentences = segment_document("First one. Second one is here. Third!", words, 4)
    assert [s.text for s in sentences] == ["First one.", "Second one is here.", "Third!"]
    quote = segment_document("> a b c. d e f.", words, 3)
    assert reassemble(quote, {0: "x\n\ny", 1: "z"}).text == "> x\n> y z"  # quote marks on every line


def test_answers_are_fitted_to_their_place():
    heading, paragraph = segment_document("## Setup steps\n\nSee https://x.org/a and `run()` now.", words, 50)
    assert fit("## Einrichtung\nSchritte", heading) == ("Einrichtung Schritte", 0)
    assert paragraph.protected == ("https://x.org/a", "`run()`")
    done = reassemble([heading, paragraph], {0: "Einrichtung", 1: "Siehe ⟦1⟧ und ⟦2⟧ jetzt.\n\n\nEnde"})
    assert done.text == "## Einrichtung\n\nSiehe https://x.org/a und `run()` jetzt.\nEnde" and done.complete
    lost = reassemble([heading, paragraph], {0: "Einrichtung", 1: "Siehe ⟦2⟧."})
    assert lost.text.endswith("Siehe `run()`. https://x.org/a") and lost.lost_placeholders == 1
    partial = reassemble([heading, paragraph], {1: "Siehe ⟦1⟧ und ⟦2⟧."})
    assert partial.missing == [0] and partial.text.startswith("## Setup steps\n\n")


def test_language_codes_and_spec_errors(tmp_path):
    assert normalize("PT-br") == "pt-BR" and name("pt-BR") == "Portuguese (Brazil)" and name("zh-Hant").endswith(
        "(Traditional)")
    base = {"input": {"path": "x.jsonl"}, "output": {"path": "out"}}
    job = JobSpec.model_validate({**base, "task": {"type": "translate", "source_language": "English",
                                                   "target_languages": ["DE", "fr"]}})
    assert job.task.documents and job.task.source_language == "en" and job.task.target_languages == ["de", "fr"]
    assert not JobSpec.model_validate({**base, "task": {"type": "translate"}}).task.documents  # old jobs unchanged
    from genfarm.spec import load_job

    for task, expected in [
        ("{type: translate, target_languages: [de, klingon]}",
         "task.target_languages: 'klingon' is not a BCP 47 language code genfarm knows"),
        ("{type: translate, target_languages: [de, DE]}", "names a language twice"),
        ("{type: translate, target_language: fr, target_languages: [de]}", "not both"),
        ("{type: translate, target_languages: [de], glossary: {job: {fr: travail}}}", "not a target language"),
        ("{type: translate, target_languages: [de], segment: {max_token: 5}}", "did you mean 'max_tokens'"),
    ]:
        (tmp_path / "job.yaml").write_text(f"input: {{path: x.jsonl}}\noutput: {{path: out}}\ntask: {task}\n")
        with pytest.raises(UserError) as info:
            load_job(tmp_path / "job.yaml")
        assert expected in str(info.value) and "Fix:" in str(info.value) and "\n" not in str(info.value)


# --- whole jobs on the real engine ------------------------------------------------------------------------------


def run(job: JobSpec) -> dict:
    from genfarm.batch.job import run_job

    return run_job(job, show_progress=False)


def documents(output) -> pd.DataFrame:
    return pd.read_parquet(Path(output) / "_documents").set_index(["document_id", "target_language"]).sort_index()


@pytest.fixture(scope="module")
def long_job(tmp_path_factory, tiny, ray_session):
    """A Markdown document several times longer than the context, translated by two engine actors."""
    folder = tmp_path_factory.mktemp("long")
    document = "\n\n".join([GUIDE.strip()] * 4) + "\n"
    data = write_jsonl(folder / "docs.jsonl", [{"id": "guide", "text": document}])
    job = make_job(data, folder / "out", tiny,
                   task={"type": "translate", "source_language": "en", "target_languages": ["de"],
                         "segment": {"max_tokens": 48}},
                   sampling={"max_tokens": 24}, workers={"count": 2, "batch_size": 4})
    return job, document, run(job)


def test_long_markdown_document_comes_back_whole_and_in_order(long_job, tiny):
    from transformers import AutoTokenizer

    job, document, summary = long_job
    tokenizer = AutoTokenizer.from_pretrained(tiny)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    assert count(document) > 4 * job.engine.max_model_len
    segments = segment_document(document, count, 48)
    translatable = [s for s in segments if s.translate]
    assert summary["status"] == "complete" and summary["input_rows"] == len(translatable)
    assert summary["documents"] == {"documents": 1, "complete": 1, "partial": 0, "failed": 0,
                                    "output": str(Path(job.output.path) / "_documents")}
    ledger = pd.read_parquet(job.output.path)
    assert ledger["worker_id"].nunique() == 2  # segments were generated by both engine actors
    assert sorted(ledger["id"]) == sorted(f"guide/de/{s.index}" for s in translatable)
    doc = documents(job.output.path).loc[("guide", "de")]
    assert doc["status"] == "complete" and list(doc["failed_segments"]) == []
    assert doc["segments"] == len(segments) and doc["translated_segments"] == len(translatable)
    assert doc["source_language"] == "en"
    assert doc["prompt_tokens"] == ledger["prompt_tokens"].sum()
    assert doc["completion_tokens"] == ledger["completion_tokens"].sum()
    text = doc["text"]
    assert len(paragraphs(text)) == len(paragraphs(document))
    assert FENCE.findall(text) == FENCE.findall(document)
    assert all(url in text for url in URL.findall(document))
    # every segment's answer sits at its own place: after the previous segment's, before the next one's
    answers = ledger.set_index("segment_index")["output_text"]
    position = 0
    for segment in segments:
        piece = segment.text if not segment.translate else fit(answers[segment.index], segment)[0]
        found = text.find(segment.prefix + piece, position)
        assert found >= position, (segment.index, piece)
        position = found + len(segment.prefix + piece)
    assert position == len(text.rstrip("\n")) or text[position:].strip() == ""


def test_resumed_job_regenerates_lost_segments_and_reassembles(long_job):
    job, _, _ = long_job
    out = Path(job.output.path)
    before = documents(out).loc[("guide", "de"), "text"]
    parts = sorted(p for p in os.listdir(out) if p.endswith(".parquet"))
    os.remove(out / parts[0])  # as if the job had died before committing this part
    os.remove(out / "_documents" / os.listdir(out / "_documents")[0])
    summary = run(job)
    assert summary["status"] == "complete" and summary["run_completion_tokens"] > 0
    assert documents(out).loc[("guide", "de"), "text"] == before  # seeded per segment id: the same text again


def test_fan_out_glossary_context_and_a_failed_segment(tmp_path, tiny, ray_session):
    huge = " ".join(f"word{i % 10} bees." for i in range(120))  # one paragraph, over the prompt room alone
    rows = [{"id": "long", "text": f"# Bees\n\nThe hive is warm.\n\nBees make honey for the hive.\n\n{huge}"},
            {"id": "a", "text": "Honey is sweet. The hive keeps it."}, {"id": "b", "text": "Water is wet."},
            {"id": "empty", "text": "   "}]
    data = write_jsonl(tmp_path / "docs.jsonl", rows)
    job = make_job(data, tmp_path / "out", tiny,
                   task={"type": "translate", "source_language": "en", "target_languages": ["de", "fr", "pt-BR"],
                         "context": True, "glossary": {"hive": {"de": "Bienenstock", "fr": "ruche"}},
                         "segment": {"max_tokens": 1000}},
                   sampling={"max_tokens": 16})
    summary = run(job)
    docs = documents(tmp_path / "out")
    assert summary["status"] == "complete" and summary["documents"]["documents"] == 12
    assert sorted(docs.index.get_level_values(1).unique()) == ["de", "fr", "pt-BR"]
    for lang in ("de", "fr", "pt-BR"):
        long_doc = docs.loc[("long", lang)]
        assert long_doc["status"] == "partial" and list(long_doc["failed_segments"]) == [3]
        assert "prompt_too_long" in long_doc["errors"][0] and long_doc["errors"][0].startswith("segment 3:")
        assert huge in long_doc["text"]  # the failed segment keeps its source text, marked by status, not hidden
        assert docs.loc[("a", lang), "status"] == docs.loc[("b", lang), "status"] == "complete"
        assert docs.loc[("empty", lang), "status"] == "failed" and "empty_prompt" in docs.loc[("empty", lang),
                                                                                               "errors"][0]
    assert (docs.loc[("a", "de"), ["segments", "translated_segments"]] == [1, 1]).all()
    assert docs.loc[("a", "fr"), "prompt_tokens"] > 0 and docs.loc[("a", "fr"), "completion_tokens"] > 0
    ledger = pd.read_parquet(tmp_path / "out").set_index("id")
    assert set(ledger["target_language"]) == {"de", "fr", "pt-BR"} and set(ledger["source_language"]) == {"en"}
    assert ledger.loc["a/pt-BR/0", "segment_count"] == 1 and ledger.loc["long/de/2", "segment_index"] == 2
    assert "from English to Portuguese (Brazil)" in ledger.loc["a/pt-BR/0", "prompt"]
    assert "hive -> Bienenstock" in ledger.loc["a/de/0", "prompt"]  # glossary terms the segment uses
    assert "Bienenstock" not in ledger.loc["b/de/0", "prompt"]
    assert "hive -> ruche" in ledger.loc["long/fr/1", "prompt"] and "hive ->" not in ledger.loc["a/pt-BR/0", "prompt"]
    assert "The hive is warm." in ledger.loc["long/de/2", "prompt"].split("Text to translate")[0]  # context
    errors = pd.read_parquet(tmp_path / "out" / "_errors").set_index("id")
    assert sorted(errors.index) == ["empty", "long/de/3", "long/fr/3", "long/pt-BR/3"]
    status = genfarm("status", tmp_path / "out")
    assert status.returncode == 0 and "documents: 12 (6 complete, 3 partial, 3 failed)" in status.stdout


# --- genfarm eval -----------------------------------------------------------------------------------------------

def genfarm(*args) -> subprocess.CompletedProcess:
    return genfarm_in(*args, cwd=ROOT)  # examples/ paths are relative to the repository


def translated_output(tmp_path: Path, keep: int | None = None) -> Path:
    """A job folder whose documents are imperfect translations: each reference with words dropped or changed."""
    out = tmp_path / "out"
    (out / "_genfarm").mkdir(parents=True)
    (out / "_genfarm" / "job.json").write_text(json.dumps({"job_id": "eval-test",
                                                           "spec": {"task": {"type": "translate"}}}))
    (out / "_documents").mkdir()
    rows = []
    for file in sorted((ROOT / "examples/references").glob("*.jsonl")):
        for n, line in enumerate(file.read_text().splitlines()[:keep]):
            ref = json.loads(line)
            tokens = ref["reference"].split()
            hypothesis = " ".join(tokens[:-1] if n % 2 else tokens[::-1] if n % 3 == 0 else tokens)
            rows.append({"document_id": ref["id"], "target_language": ref["target_language"], "text": hypothesis,
                         "status": "complete"})
    pq.write_table(pa.Table.from_pylist(rows), out / "_documents" / "x.parquet")
    return out


def test_eval_reproduces_sacrebleu_on_the_reference_set(tmp_path):
    out = translated_output(tmp_path)
    result = genfarm("eval", out, "--references", "examples/references", "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    docs = pd.read_parquet(out / "_documents")
    assert [c["target_language"] for c in scores["corpus"]] == ["de", "es", "fr"]
    for corpus in scores["corpus"]:
        lang = corpus["target_language"]
        refs = [json.loads(line) for line in (ROOT / f"examples/references/en-{lang}.jsonl").read_text().splitlines()]
        hyps = docs[docs.target_language == lang].set_index("document_id").loc[[r["id"] for r in refs], "text"]
        (tmp_path / "ref.txt").write_text("".join(r["reference"] + "\n" for r in refs))
        (tmp_path / "hyp.txt").write_text("".join(h + "\n" for h in hyps))
        own = subprocess.run([sys.executable, "-m", "sacrebleu", tmp_path / "ref.txt", "-i", tmp_path / "hyp.txt",
                              "-m", "bleu", "chrf", "-b", "-w", "4"], capture_output=True, text=True, check=True)
        bleu, chrf = json.loads(own.stdout)
        assert corpus["documents"] == 15 and 0 < bleu < 100
        assert round(corpus["bleu"], 4) == bleu and round(corpus["chrf"], 4) == chrf
    assert len(scores["documents"]) == 45 and {d["status"] for d in scores["documents"]} == {"complete"}
    table = genfarm("eval", out, "--references", "examples/references")
    assert table.returncode == 0 and "corpus (sacrebleu)" in table.stdout and "nrefs:1" in table.stdout


def test_eval_bad_input_is_one_line_and_exit_2(tmp_path):
    out = translated_output(tmp_path, keep=5)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"id": "r01", "target_language": "de", "reference": "Grüße"}\n'.encode("latin-1"))
    cases = [
        (["--references", tmp_path / "nope.jsonl"], "nope.jsonl: not found"),
        (["--references", "examples/references"], "30 of 45 references have no translation in OUTPUT"),
        (["--references", write_jsonl(tmp_path / "a.jsonl", [{"id": "r01", "target_language": "de"}])],
         "missing or empty field(s): reference"),
        (["--references", write_jsonl(tmp_path / "b.jsonl", ['{"id": "r01",'])], "not valid JSON"),
        (["--references", latin1], "latin1.jsonl: cannot read it as UTF-8 text"),
    ]
    for args, expected in cases:
        result = genfarm("eval", out, *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0] and "Fix:" in lines[0], result
    assert genfarm("eval", out, "--references", "examples/references", "--allow-missing").returncode == 0
    assert "holds no genfarm job" in genfarm("eval", tmp_path, "--references", "examples/references").stderr
    (out / "_genfarm" / "job.json").write_text(json.dumps({"job_id": "x", "spec": {"task": {"type": "article"}}}))
    other = genfarm("eval", out, "--references", "examples/references")
    assert other.returncode == 2 and "has task.type article, not translate" in other.stderr
