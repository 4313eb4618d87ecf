"""OpenAI batch requests as a task: each row is one line of an OpenAI batch input file (input.format openai-batch:
custom_id, method, url, body), answered as the online API answers the same request, and written as OpenAI's output
and error files beside the Parquet results (genfarm/batch/openai_files.py).

The body is validated by the online API's own request models and structured-output rules, so a line the service
would refuse with a 400 becomes an `invalid_request` error row with the same code, parameter and message, and the
job goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError

from genfarm.batch.openai_files import ENDPOINTS, OpenAIFilesSink, collect, request_error
from genfarm.rows import Prompt, RowError
from genfarm.serve import protocol as api
from genfarm.serve.constraints import constraint
from genfarm.serve.responses import APIError
from genfarm.spec import TaskConfig
from genfarm.task import FinishedJob, RowSampling, Task

REQUESTS = {"/v1/chat/completions": api.ChatRequest, "/v1/completions": api.CompletionRequest}
assert set(REQUESTS) == set(ENDPOINTS)


class OpenAIConfig(TaskConfig):
    type: Literal["openai"]
    menu_order = 80
    models: list[str] = Field(
        default_factory=list, description="Model names a request's body.model may give (the job's model answers "
        "them all); a request naming another is a model_not_found error. Empty: any name.")
    endpoint: Literal["/v1/chat/completions", "/v1/completions"] | None = Field(
        None, description="The url every request must have (an OpenAI batch's endpoint); default: either.")


@dataclass(frozen=True)
class Request:
    prompt: Prompt
    sampling: RowSampling


def refuse(code: str, message: str, param: str | None = None) -> RowError:
    return RowError("invalid_request", request_error(code, message, param))


def validation_error(err: ValidationError) -> RowError:
    """A body the request model refuses, in the words of the online API's 400 (genfarm/serve/app.py)."""
    first = err.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first.get("loc", ())) or None
    if first.get("type") == "extra_forbidden":
        return refuse("invalid_parameter", f"unsupported parameter {param!r}; remove it (see /docs for the "
                      "parameters genfarm accepts)", param)
    return refuse("invalid_parameter", f"{param}: {first.get('msg')}", param)


class OpenAIRequests(Task):
    """Each row an OpenAI API request (/v1/chat/completions or /v1/completions)."""

    Config = OpenAIConfig
    # The answer is the model's, as the API would give it: no quality checks unless the job file asks for some.
    quality_defaults = {"truncated": "off", "empty": False, "repetition": False}
    config: OpenAIConfig

    def __init__(self, config: OpenAIConfig):
        super().__init__(config)
        self._last: tuple[tuple, Request | RowError] | None = None

    def required_columns(self) -> list[str]:
        return ["method", "url", "body"]

    def prompt(self, row: dict) -> Prompt:
        return self.request(row).prompt

    def sampling(self, row: dict) -> RowSampling:
        return self.request(row).sampling

    def request(self, row: dict) -> Request:
        """The row's request, checked as the online API checks it (kept for the row's next call)."""
        key = (row.get("_gf_id"), row.get("method"), row.get("url"), row.get("body"))
        last = self._last  # one read: batches in flight call this from several threads at once
        if last is None or last[0] != key:
            try:
                last = (key, self.check(row))
            except RowError as err:
                last = (key, err)
            self._last = last
        answer = last[1]
        if isinstance(answer, RowError):
            raise answer
        return answer

    def check(self, row: dict) -> Request:
        if row.get("method") != "POST":
            raise refuse("invalid_method", f"method {row.get('method')!r} is not supported; use POST")
        url = row.get("url")
        allowed = [self.config.endpoint] if self.config.endpoint else list(REQUESTS)
        if url not in allowed:
            raise refuse("invalid_url", f"url {url!r} is not supported here; use {' or '.join(allowed)}")
        try:
            body = REQUESTS[url].model_validate_json(row.get("body") or "null")
        except ValidationError as err:
            if not err.errors()[0].get("loc"):  # the body itself: no JSON object
                raise refuse("invalid_json", "the request body is not a JSON object", "body") from None
            raise validation_error(err) from None
        if self.config.models and body.model not in self.config.models:
            raise refuse("model_not_found", f"model {body.model!r} is not served here; use "
                         f"{self.config.models[0]!r} (GET /v1/models)", "model")
        if body.stream:
            raise refuse("invalid_parameter", "a batch request cannot stream; leave stream out", "stream")
        try:
            structured = constraint(body)
        except APIError as err:
            raise refuse(err.code or "invalid_parameter", err.message, err.param) from None
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        if isinstance(body, api.ChatRequest):
            prompt = Prompt(messages=[m.for_template() for m in body.messages])
            max_tokens = body.max_completion_tokens or body.max_tokens
        else:
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise refuse("invalid_parameter", f"prompt holds {len(prompts)} prompts; send one prompt per "
                             "request", "prompt")
            prompt, max_tokens = Prompt(text=prompts[0]), body.max_tokens
        return Request(prompt, RowSampling(
            max_tokens=max_tokens, stop=None if stop is None else tuple(stop), temperature=body.temperature,
            top_p=body.top_p, n=body.n, seed=body.seed, structured=structured))

    # --- the OpenAI files --------------------------------------------------------------------------------------
    def sinks(self, output: str) -> list:
        return [OpenAIFilesSink(output)]

    def finish(self, done: FinishedJob) -> None:
        collect(done.output)
