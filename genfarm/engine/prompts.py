"""Prompt text and token ids, shared by the batch engine and the online engine."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from genfarm.spec import EngineSpec


class PromptTooLong(ValueError):
    pass


class ChatTemplateRefused(ValueError):
    """The model's chat template refuses these messages (a role it does not take, roles that do not alternate):
    the online API's 400 invalid_messages, a batch row's chat_template error."""


class PromptEncoder:
    """Chat rendering and length checks shared by the batch and online engines (both need `tokenizer`, `spec`)."""

    tokenizer: Any
    spec: EngineSpec

    def render(self, messages: list[dict] | None, text: str | None) -> str:
        """The exact prompt text: chat messages through the model's chat template, or a raw prompt as is."""
        if messages is None:
            return text
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except (ValueError, TemplateError) as err:
            raise ChatTemplateRefused(f"the model's chat template refuses these messages: {err}") from None

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
