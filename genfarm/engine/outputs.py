"""genfarm's side of a request and its answer: SamplingSpec -> vLLM sampling parameters, vLLM output -> Generation."""

from __future__ import annotations

from dataclasses import dataclass, field

from genfarm.spec import SamplingSpec


@dataclass
class Completion:
    text: str
    finish_reason: str | None  # None while a streamed completion goes on
    completion_tokens: int
    index: int = 0
    logprob: float | None = None  # the text's total log-probability, when a request asked for logprobs


@dataclass
class Generation:
    prompt_tokens: int
    completions: list[Completion] = field(default_factory=list)


def to_sampling_params(cls, spec: SamplingSpec, seed: int | None, extra: dict | None = None):
    """`cls(...)` for vllm.SamplingParams (passed in: vLLM is imported only where an engine runs). `extra` holds
    more of vLLM's sampling parameters for one request: `structured` (one output constraint as
    vllm.sampling_params.StructuredOutputsParams takes it: `json`, `choice`, `regex`, `grammar`, ...),
    `repetition_penalty`, `logprobs`; None or a missing key keeps vLLM's default."""
    extra = dict(extra or {})
    structured = extra.pop("structured", None)
    if structured is not None:
        from vllm.sampling_params import StructuredOutputsParams

        extra["structured_outputs"] = StructuredOutputsParams(**structured)
    return cls(
        n=spec.n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_tokens=spec.max_tokens,
        seed=seed,
        stop=list(spec.stop) or None,
        **{key: value for key, value in extra.items() if value is not None},
    )


def to_generation(output) -> Generation:
    return Generation(
        prompt_tokens=len(output.prompt_token_ids),
        completions=[
            Completion(c.text, c.finish_reason or "unknown", len(c.token_ids), c.index, c.cumulative_logprob)
            for c in output.outputs
        ],
    )
