"""The batch engine: a vLLM engine in this process, owned by one loop thread that several in-flight batches feed."""

from __future__ import annotations

import itertools
import queue
import threading
import time

from genfarm.engine.outputs import to_generation, to_sampling_params
from genfarm.engine.prompts import PromptEncoder
from genfarm.engine.settings import engine_args, prepare_process_env
from genfarm.models import ResolvedModel
from genfarm.spec import EngineSpec, SamplingSpec


class Engine(PromptEncoder):
    """A vLLM engine in this process, fed token ids so that every prompt is checked before it reaches vLLM."""

    def __init__(self, model: ResolvedModel, spec: EngineSpec, gpu: bool = False):
        prepare_process_env(model, spec, gpu)
        self.model, self.spec = model, spec
        self._request_ids = itertools.count()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._init_error: BaseException | None = None
        self.tokens_estimate = 0  # tokens generated so far, estimated step by step (see _run)
        self.prompt_tokens_seen = 0  # prompt tokens of finished requests, and those vLLM's prefix cache served
        self.prompt_tokens_cached = 0
        ready = threading.Event()
        self._loop = threading.Thread(target=self._run, args=(engine_args(model, spec, gpu), ready),
                                      name="genfarm-engine-loop", daemon=True)
        self._loop.start()
        ready.wait()
        if self._init_error is not None:
            raise self._init_error
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompts: list[list[int]], sampling: list[SamplingSpec], seeds: list[int | None],
                 extras: list[dict | None] | None = None) -> list:
        """One Generation per prompt, or the exception that prompt alone raised (a rejected prompt, a timeout).
        `extras` holds each prompt's further sampling parameters (see to_sampling_params), or is None for none.

        Thread-safe: batches from several threads feed one engine loop, so the engine never idles while one
        batch waits for its longest answer. Raises EngineDead if the engine itself failed.
        """
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        extras = extras if extras is not None else [None] * len(prompts)
        batch = _Batch(len(prompts))
        for index, (ids, spec, seed, extra) in enumerate(zip(prompts, sampling, seeds, extras)):
            params = to_sampling_params(SamplingParams, spec, seed, extra)
            params.output_kind = RequestOutputKind.FINAL_ONLY
            self._inbox.put((batch, index, ids, params))
        batch.done.wait()
        if batch.failure is not None:
            raise EngineDead(f"the vLLM engine failed: {batch.failure!r}") from batch.failure
        return batch.results

    def _run(self, args: dict, ready: threading.Event) -> None:
        """The one thread that owns vLLM: builds the engine, then adds what arrived, steps, hands out what
        finished and aborts the overdue. The engine is built here, not in the caller's thread, because torch keeps
        its full CPU thread team only in the thread that created the engine (measured: a CPU engine stepped from
        another thread generated about a quarter fewer tokens/s)."""
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
        running_cap = engine.vllm_config.scheduler_config.max_num_seqs
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
                outputs = engine.step()
                # Each step decodes about one token per running request: a live figure for progress displays,
                # long before a batch finishes (the exact counts come with the results).
                self.tokens_estimate += min(len(pending), running_cap)
                for output in outputs:
                    if output.finished and output.request_id in pending:
                        batch, index, _ = pending.pop(output.request_id)
                        self.prompt_tokens_seen += len(output.prompt_token_ids or ())
                        self.prompt_tokens_cached += output.num_cached_tokens or 0
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
