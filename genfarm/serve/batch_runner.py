"""A batch's runner: a named, detached Ray actor on the service's cluster that runs the batch as a genfarm batch job
(genfarm.batch.job.run_job, in a Ray task with its own engine actors, never in a replica) and moves its status on.

    validating -> in_progress -> finalizing -> completed
                             \\-> failed
    (a cancel file)          -> cancelling -> cancelled
    (past expires_at)        -> expired

There is at most one runner per batch on a cluster: its name is the batch's, and creating it with get_if_exists is
atomic, so however many replicas find a batch without a runner (the service was restarted, the cluster lost the
node), exactly one starts it again, and the job resumes through its ledger with every committed request kept.
A cancelled or expired batch returns what finished: the committed requests, and an error line for every other one.
"""

from __future__ import annotations

import time

import ray

from genfarm.batch.ledger import MANIFEST, Ledger
from genfarm.batch.openai_files import FOLDER, collect
from genfarm.serve.batch_store import BATCHES, FINAL, JOB, Store

NAMESPACE = "genfarm-batches"
POLL_S = 1.0
PENDING = {"cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
           "expired": ("batch_expired", "this request could not be run before the batch's completion window "
                       "ended")}


def runner_name(batch_id: str) -> str:
    return f"runner-{batch_id}"


def runner_alive(batch_id: str) -> bool:
    try:
        ray.get_actor(runner_name(batch_id), namespace=NAMESPACE)
        return True
    except ValueError:
        return False


def ensure_runner(storage: str, batch_id: str) -> None:
    """Start the batch's runner unless it runs (one per batch on the cluster, whoever asks)."""
    if runner_alive(batch_id):
        return
    runner = ray.remote(BatchRunner).options(
        name=runner_name(batch_id), namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_restarts=0).remote(storage, batch_id)
    runner.run.remote()  # a runner that already ran it only finds the batch finished


@ray.remote(num_cpus=0, max_retries=0)
def run_batch_job(job: dict) -> dict:
    """The batch's genfarm job (the driver of its Ray Data pipeline), resumed through its ledger if it ran before."""
    from genfarm.batch.job import run_job
    from genfarm.spec import JobSpec

    return run_job(JobSpec.model_validate(job), show_progress=False)


class BatchRunner:
    def __init__(self, storage: str, batch_id: str):
        self.store, self.id = Store(storage), batch_id

    def run(self) -> None:
        try:
            record = self.store.batch(self.id)
            if record["status"] not in FINAL:
                self.supervise(record)
        except Exception as err:  # noqa: BLE001 - a bug of ours fails the batch rather than retrying it forever
            self.finish(self.store.batch(self.id), "failed", error=f"{type(err).__name__}: {err}")
        finally:
            ray.actor.exit_actor()

    def stop_reason(self, record: dict) -> str | None:
        if self.store.cancel_requested(self.id) is not None:
            return "cancelled"
        if record.get("expires_at") and time.time() > record["expires_at"]:
            return "expired"
        return None

    def supervise(self, record: dict) -> None:
        stop = self.stop_reason(record)
        if stop is None and record["status"] == "validating":
            record.update(status="in_progress", in_progress_at=int(time.time()))
            self.store.save_batch(record)
        if stop is None and record["status"] != "finalizing":
            job = run_batch_job.remote(record["_job"])
            while stop is None:
                done, _ = ray.wait([job], timeout=POLL_S)
                if done:
                    try:
                        ray.get(job)
                    except Exception as err:  # noqa: BLE001 - the job's failure is the batch's
                        return self.finish(record, "failed", error=_last_line(err))
                    # A cancel that came while the last requests finished was answered "cancelling": it ends so
                    stop = "cancelled" if self.store.cancel_requested(self.id) is not None else None
                    break
                stop = self.stop_reason(record)
            if stop is not None:
                self.stop_job(job)
        if stop is None:
            record.update(status="finalizing", finalizing_at=record.get("finalizing_at") or int(time.time()))
            self.store.save_batch(record)
            return self.finish(record, "completed")
        if stop == "cancelled":
            record.update(status="cancelling", cancelling_at=self.store.cancel_requested(self.id))
            self.store.save_batch(record)
        self.finish(record, stop)

    def stop_job(self, job) -> None:
        """Kill the job (its engine actors go with it; committed parts stay), and take the ledger from it, so that
        no engine still finishing a batch commits after the files are joined (workers check the run token)."""
        ray.cancel(job, force=True)
        ray.wait([job], timeout=30)
        ledger = Ledger(self.store.job_output(self.id))
        if ledger.read_json(MANIFEST) is not None:
            ledger.start_run(f"stopped-{self.id}", time.strftime("%Y-%m-%dT%H:%M:%S"))

    def finish(self, record: dict, status: str, error: str | None = None) -> None:
        """Join the result files (with an error line for each request that never ran), register them as the
        owner's files, and record the final status."""
        output = self.store.job_output(self.id)
        if Ledger(output).read_json(MANIFEST) is not None:  # the job got as far as its ledger
            pending = PENDING.get(status, ("batch_failed", error or "the batch failed"))
            files = collect(output, None if status == "completed" else pending)
            folder = f"{BATCHES}/{self.id}/{JOB}/{FOLDER}"
            for kind, field in (("output", "output_file_id"), ("errors", "error_file_id")):
                lines = files["completed" if kind == "output" else "failed"]
                if lines and not record.get(field):
                    name = files[kind].rsplit("/", 1)[-1]
                    record[field] = self.store.add_output(record["_owner"], f"{self.id}_{name}",
                                                          f"{folder}/{name}", lines)["id"]
            total = record["request_counts"]["total"]
            record["request_counts"] = {"total": total, "completed": files["completed"], "failed": files["failed"]}
            record["usage"] = {"input_tokens": files["prompt_tokens"], "output_tokens": files["completion_tokens"],
                               "total_tokens": files["prompt_tokens"] + files["completion_tokens"],
                               "input_tokens_details": {"cached_tokens": 0},
                               "output_tokens_details": {"reasoning_tokens": 0}}
        if error is not None:
            record["errors"] = {"object": "list", "data": [{"code": "batch_failed", "message": error, "param": None,
                                                             "line": None}]}
        record.update(status=status, **{f"{status}_at": int(time.time())})
        self.store.save_batch(record)


def _last_line(err: Exception) -> str:
    """The gist of a failed job (a RayTaskError carries the whole traceback): its last line."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:1000] if lines else type(err).__name__
