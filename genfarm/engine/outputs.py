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


@dataclass
class Generation:
    prompt_tokens: int
    completions: list[Completion] = field(default_factory=list)


def to_sampling_params(cls, spec: SamplingSpec, seed: int | None, structured: dict | None = None):
    """`cls(...)` for vllm.SamplingParams (passed in: vLLM is imported only where an engine runs). `structured` is
    one output constraint as vllm.sampling_params.StructuredOutputsParams takes it (`json`, `choice`, `regex`,
    `grammar`, ...); None leaves the output free."""
    structured_outputs = None
    if structured is not None:
        from vllm.sampling_params import StructuredOutputsParams

        structured_outputs = StructuredOutputsParams(**structured)
    return cls(
        n=spec.n,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_tokens=spec.max_tokens,
        seed=seed,
        stop=list(spec.stop) or None,
        structured_outputs=structured_outputs,
    )


def to_generation(output) -> Generation:
    return Generation(
        prompt_tokens=len(output.prompt_token_ids),
        completions=[
            Completion(c.text, c.finish_reason or "unknown", len(c.token_ids), c.index) for c in output.outputs
        ],
    )
