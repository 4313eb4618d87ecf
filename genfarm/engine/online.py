"""The online engine: vLLM's AsyncLLM for the serve replicas, and the reaper that outlives them."""

from __future__ import annotations

import itertools
import os

from genfarm.engine.outputs import Completion, to_sampling_params
from genfarm.engine.prompts import PromptEncoder
from genfarm.engine.settings import engine_args, prepare_process_env
from genfarm.models import ResolvedModel
from genfarm.spec import EngineSpec, SamplingSpec


class InvalidRequest(ValueError):
    """vLLM refused a request's parameters (e.g. n > 1 with greedy sampling)."""


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

    def params(self, sampling: SamplingSpec, seed: int | None, extra: dict | None = None):
        """vLLM's sampling parameters for streaming; a ValueError names what vLLM refuses (e.g. n > 1 when greedy).
        `extra` holds the request's further sampling parameters (see to_sampling_params), e.g. its constraint."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        try:
            params = to_sampling_params(SamplingParams, sampling, seed, extra)
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
                    Completion(c.text, c.finish_reason, len(c.token_ids), c.index, c.cumulative_logprob)
                    for c in output.outputs
                ]
        except (VLLMClientError, ValueError) as err:  # checks vLLM makes only once the request is in; some raise
            raise InvalidRequest(str(err)) from None  # a plain ValueError (a structured-output regex with a NUL)

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
