"""The only module that touches vLLM: engine settings, prompt encoding, generation.

Batch workers and the online service both build their engines from `engine_args`, so a job file and a serve config
that name the same model and engine settings get the same engine.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from genfarm.models import ResolvedModel
from genfarm.spec import EngineSpec, SamplingSpec

GIB = 1 << 30


def use_gpu(spec: EngineSpec, gpus_available: float) -> bool:
    return spec.device == "gpu" or (spec.device == "auto" and gpus_available > 0)


def worker_resources(spec: EngineSpec, gpus_available: float) -> dict[str, float]:
    """Ray resources of one engine actor: tensor-parallel engines need one GPU per shard."""
    if not use_gpu(spec, gpus_available):
        return {"num_cpus": spec.cpus_per_worker, "num_gpus": 0}
    gpus = spec.gpus_per_worker if spec.gpus_per_worker is not None else spec.tensor_parallel_size
    return {"num_cpus": spec.cpus_per_worker, "num_gpus": gpus}


def engine_args(model: ResolvedModel, spec: EngineSpec, gpu: bool) -> dict[str, Any]:
    """Keyword arguments for vllm.LLM / AsyncEngineArgs, from genfarm's engine spec."""
    args: dict[str, Any] = {
        "model": model.path,
        "tokenizer": model.path,
        "dtype": spec.dtype,
        "max_model_len": spec.max_model_len,
        "max_num_seqs": spec.max_num_seqs,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "enforce_eager": spec.enforce_eager,
        "seed": 0,
    }
    if is_hub_model(model):  # pin the revision the user asked for
        args["revision"] = model.revision
    if gpu:
        if spec.tensor_parallel_size > 1:
            # Inside a Ray actor that already holds the GPUs, worker processes beat a nested Ray placement.
            args["distributed_executor_backend"] = "mp"
    else:
        # The CPU backend's default memory check reads one NUMA node only; an explicit KV-cache size avoids it.
        args["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * GIB)
    return args


def is_hub_model(model: ResolvedModel) -> bool:
    return model.path == model.name and not os.path.isdir(model.path)


def prepare_process_env(model: ResolvedModel, spec: EngineSpec, gpu: bool, in_process: bool = True) -> None:
    """Settings that must be in place before vLLM is imported in this process. The online engine (AsyncLLM)
    always runs its core in a separate process (`in_process=False`)."""
    if not is_hub_model(model):
        os.environ["HF_HUB_OFFLINE"] = "1"  # only a hub model the user named may reach a hub
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not gpu and in_process:
        # In-process engine on CPU: ~2 s start instead of 12-15 s, and nothing leaks into /dev/shm if Ray kills us.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not gpu:
        # Ray sets OMP_NUM_THREADS to the actor's reserved CPUs (1), which would leave a CPU engine one core.
        os.environ["OMP_NUM_THREADS"] = str(spec.cpu_threads or os.cpu_count() or 1)


@dataclass
class Completion:
    text: str
    finish_reason: str | None  # None while a streamed completion goes on
    completion_tokens: int
    index: int = 0


@dataclass
class Generation:
    prompt_tokens: int
    completions: list[Completion] = field(default_factory=list)


class PromptTooLong(ValueError):
    pass


class InvalidRequest(ValueError):
    """vLLM refused a request's parameters (e.g. n > 1 with greedy sampling)."""


class PromptEncoder:
    """Chat rendering and length checks shared by the batch and online engines (both need `tokenizer`, `spec`)."""

    tokenizer: Any
    spec: EngineSpec

    def render(self, messages: list[dict] | None, text: str | None) -> str:
        """The exact prompt text: chat messages through the model's chat template, or a raw prompt as is."""
        if messages is None:
            return text
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt: str, max_tokens: int) -> list[int]:
        """Token ids of a rendered prompt; over-long prompts are cut from the left or refused, per the spec."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        limit = self.spec.max_model_len - min(max_tokens, self.spec.max_model_len // 2)
        if len(ids) > limit:
            if self.spec.long_prompts == "error":
                raise PromptTooLong(
                    f"prompt has {len(ids)} tokens; max_model_len {self.spec.max_model_len} leaves room for {limit}"
                    " beside max_tokens (raise engine.max_model_len or set engine.long_prompts: truncate)"
                )
            ids = ids[-limit:]
        return ids


class Engine(PromptEncoder):
    """A vLLM engine in this process, fed token ids so that every prompt is checked before it reaches vLLM."""

    def __init__(self, model: ResolvedModel, spec: EngineSpec, gpu: bool = False):
        prepare_process_env(model, spec, gpu)
        self.model, self.spec = model, spec
        self._request_ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._init_error: BaseException | None = None
        ready = threading.Event()
        self._loop = threading.Thread(target=self._run, args=(engine_args(model, spec, gpu), ready),
                                      name="genfarm-engine-loop", daemon=True)
        self._loop.start()
        ready.wait()
        if self._init_error is not None:
            raise self._init_error
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[list[int]], sampling: list[SamplingSpec], seeds: list[int | None]) -> list:
        """One Generation per prompt, or the exception that prompt alone raised (a rejected prompt, a timeout).

        Thread-safe: batches from several threads feed one engine loop, so the engine never idles while one
        batch waits for its longest answer. Raises EngineDead if the engine itself failed.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        batch = _Batch(len(prompts))
        for index, (ids, spec, seed) in enumerate(zip(prompts, sampling, seeds)):
            params = to_sampling_params(SamplingParams, spec, seed)
            params.output_kind = RequestOutputKind.FINAL_ONLY
            self._inbox.put((batch, index, ids, params))
        batch.done.wait()
        if batch.failure is not None:
            raise EngineDead(f"the vLLM engine failed: {batch.failure!r}") from batch.failure
        return batch.results

    def _run(self, args: dict, ready: threading.Event) -> None:
        """The one thread that owns vLLM: builds the engine, then adds what arrived, steps, hands out what
        finished and aborts the overdue. The engine is built here, not in the caller's thread, because torch keeps
        its full CPU thread team only in the thread that created the engine (measured on 2 cores: ~500 tok/s when
        another thread steps it, ~680 tok/s here)."""
        try:
            from vllm import LLM
            from vllm.inputs import TokensPrompt

            self.llm = LLM(**args)
        except BaseException as err:  # noqa: BLE001 - raised again in the constructor's thread
            self._init_error = err
            ready.set()
            return
        ready.set()
        engine = self.llm.llm_engine
        pending: dict[str, tuple[_Batch, int, float]] = {}
        timeout = self.spec.request_timeout_s
        try:
            while True:
                arrivals = [self._inbox.get()] if not pending else []  # idle: sleep until work comes
                while not self._inbox.empty():
                    arrivals.append(self._inbox.get_nowait())
                for batch, index, ids, params in arrivals:
                    request_id = f"gf-{next(self._request_ids)}"
                    try:
                        engine.add_request(request_id, TokensPrompt(prompt_token_ids=ids), params)
                    except Exception as err:  # noqa: BLE001 - vLLM refused this prompt alone
                        batch.set(index, err)
                        continue
                    pending[request_id] = (batch, index, time.monotonic())
                if not pending:
                    continue
                for output in engine.step():
                    if output.finished and output.request_id in pending:
                        batch, index, _ = pending.pop(output.request_id)
                        batch.set(index, to_generation(output))
                if timeout is not None:
                    now = time.monotonic()
                    expired = [rid for rid, (_, _, start) in pending.items() if now - start > timeout]
                    if expired:
                        engine.abort_request(expired)
                        for rid in expired:
                            batch, index, _ = pending.pop(rid)
                            batch.set(index, TimeoutError(f"no answer within {timeout:g}s (engine.request_timeout_s)"))
        except BaseException as err:  # noqa: BLE001 - the engine is gone: fail every waiting batch, now and later
            for batch, _, _ in pending.values():
                batch.fail(err)
            while True:
                self._inbox.get()[0].fail(err)


class EngineDead(RuntimeError):
    pass


class _Batch:
    """Results of one generate() call, filled in by the engine loop."""

    def __init__(self, size: int):
        self.results: list = [None] * size
        self.remaining = size
        self.failure: BaseException | None = None
        self.done = threading.Event()
        if size == 0:
            self.done.set()

    def set(self, index: int, value) -> None:
        self.results[index] = value
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()

    def fail(self, err: BaseException) -> None:
        self.failure = err
        self.done.set()


def to_sampling_params(cls, spec: SamplingSpec, seed: int | None):
    return cls(
        n=spec.n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_tokens=spec.max_tokens,
        seed=seed,
        stop=list(spec.stop) or None,
    )


def to_generation(output) -> Generation:
    return Generation(
        prompt_tokens=len(output.prompt_token_ids),
        completions=[
            Completion(c.text, c.finish_reason or "unknown", len(c.token_ids), c.index) for c in output.outputs
        ],
    )


class AsyncEngine(PromptEncoder):
    """vLLM's async engine (AsyncLLM) for the online service: the same engine settings as batch workers, with
    outputs streamed as they are generated. Cancelling a stream aborts its request and frees the engine slot."""

    def __init__(self, model: ResolvedModel, spec: EngineSpec, gpu: bool = False):
        prepare_process_env(model, spec, gpu, in_process=False)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model, self.spec = model, spec
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(model, spec, gpu)))
        self.tokenizer = self.llm.get_tokenizer()
        self._request_ids = itertools.count()
        reap_children_on_exit()

    def params(self, sampling: SamplingSpec, seed: int | None):
        """vLLM's sampling parameters for streaming; a ValueError names what vLLM refuses (e.g. n > 1 when greedy)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        try:
            params = to_sampling_params(SamplingParams, sampling, seed)
        except (ValueError, VLLMClientError) as err:
            raise InvalidRequest(str(err)) from None
        params.output_kind = RequestOutputKind.DELTA
        return params

    async def stream(self, ids: list[int], params, request_id: str):
        """Yields lists of Completion deltas as tokens arrive; a completion's last delta carries its finish_reason."""
        from vllm.inputs import TokensPrompt

        request_id = f"{request_id}-{next(self._request_ids)}"  # unique even if a client reuses an id
        from vllm.exceptions import VLLMClientError

        try:
            outputs = self.llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id)
            async for output in outputs:
                yield [
                    Completion(c.text, c.finish_reason, len(c.token_ids), c.index) for c in output.outputs
                ]
        except VLLMClientError as err:  # checks vLLM makes only once the request is in
            raise InvalidRequest(str(err)) from None

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()


def reap_children_on_exit() -> None:
    """Have this process's children (the async engine's processes) killed when it dies, even by SIGKILL."""
    import subprocess
    import sys

    import psutil

    children = [str(child.pid) for child in psutil.Process().children(recursive=True)]
    if children:
        subprocess.Popen([sys.executable, "-m", "genfarm.reaper", str(os.getpid()), *children],
                         start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)

