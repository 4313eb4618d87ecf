"""Input and output on object storage for real: an S3-compatible server (moto's server mode, with authentication
enforced) that jobs read from and write to through pyarrow, as they would on S3. A job killed mid-way resumes
exactly once, documents translate, `status`/`inspect`/`eval` work on the URI, credentials come from the standard AWS
environment variables or storage_options, and a wrong bucket or missing credentials is one line."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
from conftest import make_job, topics
from test_failures import wait_for

from genfarm.batch.ledger import Ledger
from genfarm.errors import UserError
from genfarm.spec import JobSpec, OutputSpec, validate
from genfarm.storage import Location, atomic_path, glob, open_fs

REGION = "us-east-1"
# Never ask an EC2 metadata address for credentials: no traffic leaves this machine.
NO_METADATA = {"AWS_EC2_METADATA_DISABLED": "true"}
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


@dataclass
class S3Server:
    """A running moto server: its endpoint, a bucket, and the access key of an IAM user allowed s3:*."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str = "bucket"

    def env(self, **changes: str | None) -> dict[str, str]:
        """This process's environment with the standard AWS variables for this server (a None value drops one)."""
        env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
        env.update(NO_METADATA, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key,
                   AWS_DEFAULT_REGION=REGION, AWS_ENDPOINT_URL=self.endpoint)
        env.update(changes)
        return {k: v for k, v in env.items() if v is not None}

    def options(self) -> dict:
        """storage_options for a job section: the same server and credentials, without the environment."""
        return {"endpoint_override": self.endpoint, "region": REGION, "access_key": self.access_key,
                "secret_key": self.secret_key}

    def fs(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(**self.options())

    def put(self, key: str, data: bytes) -> str:
        with self.fs().open_output_stream(f"{self.bucket}/{key}") as out:
            out.write(data)
        return f"s3://{self.bucket}/{key}"

    def uri(self, key: str) -> Location:
        return Location(f"s3://{self.bucket}/{key}", self.options())


def free_port(host: str) -> int:
    with socket.create_server((host, 0)) as sock:
        return sock.getsockname()[1]


@contextmanager
def s3_server(host: str, log: Path) -> Iterator[S3Server]:
    """moto's S3 server on host:PORT (a free port), with one bucket and one IAM user; every request after the set-up
    must be signed with that user's key, as on S3."""
    import boto3

    port = free_port(host)
    endpoint = f"http://{host}:{port}"
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
    with open(log, "ab") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)], stdout=out,
                                  stderr=subprocess.STDOUT, env={**env, **NO_METADATA}, start_new_session=True)
    try:
        wait_for(lambda: _answers(endpoint) or server.poll() is not None, timeout=60, what="moto_server")
        assert server.poll() is None, f"moto_server did not start: {log.read_text()[-2000:]}"
        setup = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="genfarm")
        key = iam.create_access_key(UserName="genfarm")["AccessKey"]
        iam.put_user_policy(UserName="genfarm", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.client("s3", **setup).create_bucket(Bucket="bucket")
        # From here on moto checks every request's signature and the user's policy.
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"}), timeout=10).read()
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _answers(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    with s3_server("127.0.0.1", tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def committed_ids(output: Location) -> list[str]:
    store = Ledger(output)
    ids = []
    for errors in (False, True):
        parts = store.parts(errors)
        if parts:
            ids += ds.dataset(parts, filesystem=store.fs, format="parquet").to_table(columns=["id"])["id"].to_pylist()
    return ids


def genfarm(*args, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genfarm", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_job_on_s3_is_killed_and_resumed_exactly_once(tmp_path, tiny, s3):
    """`genfarm run` with credentials from the AWS environment variables only: s3://bucket/in/*.jsonl in,
    s3://bucket/out out; killed with SIGKILL after two parts, the same command finishes every row exactly once."""
    rows = topics(160)
    s3.put("in/a.jsonl", jsonl(rows[:80]))
    s3.put("in/b.jsonl", jsonl(rows[80:]))
    s3.put("in/notes.txt", b"not matched by the glob")
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{path: 's3://bucket/in/*.jsonl', id_column: id}}\ntask: {{type: article}}\n"
                   f"model: {{name: {tiny}}}\nengine: {{max_model_len: 512, kv_cache_gib: 0.25}}\n"
                   "sampling: {max_tokens: 48}\nworkers: {batch_size: 8}\noutput: {path: 's3://bucket/out'}\n")
    command = [sys.executable, "-m", "genfarm", "run", str(job), "--no-progress", "--json"]
    out = s3.uri("out")
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=s3.env(),
                              start_new_session=True)
    try:
        wait_for(lambda: len(Ledger(out).parts()) >= 2 or driver.poll() is not None, what="two parts on S3")
        assert driver.poll() is None, f"the job ended before it could be killed: {driver.communicate()[1][-2000:]}"
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.communicate(timeout=60)
    kept = Ledger(out).count().completed
    assert len(Ledger(out).parts()) >= 2
    again = genfarm(*command[3:], env=s3.env())
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert (summary["status"], summary["completed_rows"], summary["error_rows"]) == ("complete", 160, 0)
    assert summary["output"] == "s3://bucket/out"
    assert Ledger(out).count().completed > kept  # the second run generated the rest
    assert sorted(committed_ids(out)) == sorted(r["id"] for r in rows)  # no row lost, none repeated
    status = genfarm("status", "s3://bucket/out", env=s3.env(), timeout=120)
    assert status.returncode == 0 and "160 rows generated" in status.stdout and "complete" in status.stdout, status
    shown = genfarm("inspect", "s3://bucket/out", "--rows", "3", env=s3.env(), timeout=120)
    assert shown.returncode == 0 and "first 3 rows" in shown.stdout, shown.stderr


DOC = "# {title}\n\nThe library opens at nine. Books are returned at the desk.\n\n- Quiet rooms upstairs.\n"


def test_documents_translate_on_s3_with_storage_options(tmp_path, tiny, ray_session, s3):
    """A translate job over Markdown documents, credentials in input/output.storage_options (the environment has
    none): documents come back per target language on S3, `status` and `eval` read them there, and the secrets are
    not written to the manifest."""
    from genfarm.batch.job import run_job

    for name in ("hours", "rooms"):
        s3.put(f"docs/{name}.md", DOC.format(title=name.title()).encode())
    job = make_job("s3://bucket/docs/*.md", "s3://bucket/docs-out", tiny,
                   input={"format": "text", "id_column": None, "storage_options": s3.options()},
                   task={"type": "translate", "source_language": "en", "target_languages": ["de", "fr"],
                         "segment": {"max_tokens": 48}},
                   sampling={"max_tokens": 24})
    job = job.model_copy(update={"output": OutputSpec(path="s3://bucket/docs-out", storage_options=s3.options())})
    summary = run_job(job, show_progress=False)
    assert summary["status"] == "complete" and summary["documents"]["documents"] == 4
    out = s3.uri("docs-out")
    store = Ledger(out)
    documents = store.read(folder="_documents").to_pylist()
    assert sorted((d["document_id"], d["target_language"]) for d in documents) == [
        ("hours.md", "de"), ("hours.md", "fr"), ("rooms.md", "de"), ("rooms.md", "fr")]
    manifest = store.read_json("_genfarm/job.json")
    assert manifest["spec"]["output"]["storage_options"] == {"endpoint_override": s3.endpoint, "region": REGION}
    assert s3.secret_key not in json.dumps(manifest)
    status = genfarm("status", "s3://bucket/docs-out", env=s3.env(), timeout=120)
    assert status.returncode == 0 and "documents: 4" in status.stdout, status
    references = tmp_path / "refs.jsonl"
    references.write_text("".join(json.dumps({"id": d, "target_language": lang, "reference": "Die Bibliothek."}) + "\n"
                                  for d in ("hours.md", "rooms.md") for lang in ("de", "fr")))
    scores = genfarm("eval", "s3://bucket/docs-out", "--references", references, "--json", env=s3.env(), timeout=120)
    assert scores.returncode == 0, scores.stderr
    assert "chrf" in scores.stdout.lower()


@pytest.mark.parametrize("case", ["input bucket", "output bucket", "no credentials", "wrong secret",
                                  "output credentials"])
def test_wrong_bucket_or_credentials_is_one_line(tmp_path, tiny, s3, case):
    s3.put("in/a.jsonl", jsonl(topics(3)))
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{path: 's3://bucket/in/*.jsonl', id_column: id}}\ntask: {{type: article}}\n"
                   f"model: {{name: {tiny}}}\noutput: {{path: 's3://bucket/errors-out'}}\n")
    env, sets = s3.env(), []
    if case == "input bucket":
        sets, expected = ["input.path=s3://nobucket/in/*.jsonl"], (
            "error: input.path: cannot read s3://nobucket/in/*.jsonl: bucket 'nobucket' does not exist. "
            "Fix: create it, or correct the bucket in input.path")
    elif case == "output bucket":
        sets, expected = ["output.path=s3://nobucket/out"], (
            "error: output.path: cannot write to s3://nobucket/out: bucket 'nobucket' does not exist. "
            "Fix: create it, or correct the bucket in output.path")
    elif case == "no credentials":
        env = s3.env(AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
        expected = "error: input.path: cannot read s3://bucket/in/*.jsonl: no credentials ("
    elif case == "wrong secret":
        env = s3.env(AWS_SECRET_ACCESS_KEY="wrong")
        expected = "error: input.path: cannot read s3://bucket/in/*.jsonl: access denied with the credentials given"
    else:  # input readable with the environment's key, output given a key the server does not know
        sets = ['output.storage_options={access_key: AKIAUNKNOWNUNKNOWN00, secret_key: x}']
        # the code is the first request's: reading an earlier run's manifest (a HEAD, whose 403 has no body)
        expected = ("error: output.path: cannot write to s3://bucket/errors-out: access denied with the credentials "
                    "given (ACCESS_DENIED)")
    started = time.monotonic()
    result = genfarm("run", job, *(arg for s in sets for arg in ("--set", s)), "--no-progress", env=env, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(expected), lines[0]
    assert "AWS_ACCESS_KEY_ID" in lines[0] or "bucket" in lines[0]  # the fix says what to set
    assert time.monotonic() - started < 60  # no retries against an endpoint that already answered


def test_ledger_moves_and_failed_writes_on_s3(s3):
    """What the ledger does besides committing, on an object store where a rename is a copy and a delete:
    take_errors keeps the taken rows aside and rewrites the part, move_aside leaves readers nothing, and a write
    that fails half-way leaves no object (not half of one)."""
    out = s3.uri("moves")
    store = Ledger(out)
    store.write_json("_genfarm/job.json", {"job_id": "moves"})
    errors = pa.table({"id": ["a", "b", "c"], "error_type": ["timeout", "engine_error", "timeout"]})
    store.commit(errors, "k-000000000-x.parquet", errors=True)
    store.commit(pa.table({"id": ["d"], "output_text": ["text"]}), "k-000000003-y.parquet")
    assert store.take_errors(["timeout"], "20260101-000000") == 2
    assert store.read(errors=True)["id"].to_pylist() == ["b"]
    archive = store.fs.get_file_info(pafs.FileSelector(store.path("_genfarm", "retried-20260101-000000")))
    assert [Path(i.path).name for i in archive] == ["k-000000000-x.parquet"]
    kept = store.move_aside("20260101-000001")
    assert store.parts() == [] and store.parts(errors=True) == [] and store.read_json("_genfarm/job.json") is None
    moved = store.fs.get_file_info(pafs.FileSelector(kept, recursive=True))
    assert sorted(Path(i.path).name for i in moved if i.type == pafs.FileType.File) == [
        "_job.json", "k-000000000-x.parquet", "k-000000003-y.parquet"]
    final = store.path("half.parquet")
    with pytest.raises(RuntimeError), atomic_path(store.fs, final, store.tmp_dir) as path, \
            store.fs.open_output_stream(path) as stream:
        stream.write(b"PAR1 half a file")
        raise RuntimeError("the writer dies")
    assert store.fs.get_file_info(final).type == pafs.FileType.NotFound


def test_globs_on_a_bucket_and_options_that_travel_with_the_path(s3):
    for key in ("glob/a.jsonl", "glob/notes.txt", "glob/sub/b.jsonl", "glob/sub/c.csv"):
        s3.put(key, b"{}\n")
    fs = s3.fs()
    assert glob(fs, "bucket/glob/*.jsonl") == ["bucket/glob/a.jsonl"]
    assert glob(fs, "bucket/glob/**/*.jsonl") == ["bucket/glob/a.jsonl", "bucket/glob/sub/b.jsonl"]
    assert glob(fs, "bucket/glob/s?b/[bc].*") == ["bucket/glob/sub/b.jsonl", "bucket/glob/sub/c.csv"]
    assert glob(fs, "bucket/nothing/*.jsonl") == []
    # A spec's path carries its storage options wherever it is pickled to (a read task, an engine actor)...
    path = pickle.loads(pickle.dumps(OutputSpec(path="s3://bucket/glob", storage_options=s3.options()).path))
    remote, root = open_fs(path)
    assert root == "bucket/glob" and remote.get_file_info("bucket/glob/a.jsonl").type == pafs.FileType.File
    # ... and a name the filesystem does not take is refused where the job file is read, naming the field.
    with pytest.raises(UserError, match=r"^job.yaml: output.storage_options: pyarrow.fs.S3FileSystem takes no "
                       r"option 'endpoint'. Fix: use its arguments"):
        validate(JobSpec, {"input": {"path": "in.jsonl"}, "task": {"type": "article"},
                           "output": {"path": "s3://bucket/o", "storage_options": {"endpoint": "http://x"}}},
                 source="job.yaml")
