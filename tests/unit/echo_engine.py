"""An echo engine, for plumbing tests only (the fast layer in tests/unit: no Ray, no vLLM): it "generates" the last
words of each prompt back, instantly and deterministically, with no model. It stands in for genfarm.engine.Engine
where a test checks what genfarm does around generation (rows, columns, errors, the ledger), never what a model
writes: those tests run the real vLLM engine."""

from __future__ import annotations

from genfarm.engine import ChatTemplateRefused, Completion, Generation, PromptTooLong


class EchoEngine:
    def __init__(self, max_prompt_words: int = 200, fail_on: str | None = None, refused_role: str | None = None):
        self.max_prompt_words, self.fail_on, self.refused_role = max_prompt_words, fail_on, refused_role
        self.requests: list[tuple[list[int], object, int | None, dict | None]] = []
        self.vocabulary: list[str] = []
        self.word_ids: dict[str, int] = {}
        self.tokens_estimate = 0  # what an engine actor reports to the job's live token count
        self.prompt_tokens_seen = self.prompt_tokens_cached = 0  # an echo has no prefix cache: nothing cached

    def render(self, messages: list[dict] | None, text: str | None) -> str:
        if messages is None:
            return text
        if any(m["role"] == self.refused_role for m in messages):  # as some models' templates refuse a system role
            raise ChatTemplateRefused(f"the model's chat template refuses these messages: {self.refused_role} role "
                                      "not supported")
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def encode(self, prompt: str, max_tokens: int) -> list[int]:
        words = prompt.split()
        if len(words) > self.max_prompt_words:
            raise PromptTooLong(f"prompt has {len(words)} tokens (echo engine limit {self.max_prompt_words})")
        for word in words:
            if word not in self.word_ids:
                self.word_ids[word] = len(self.vocabulary)
                self.vocabulary.append(word)
        return [self.word_ids[word] for word in words]

    def generate(self, prompts, sampling, seeds, extras=None) -> list:
        results = []
        for index, (ids, spec, seed) in enumerate(zip(prompts, sampling, seeds)):
            self.requests.append((ids, spec, seed, extras[index] if extras else None))
            words = [self.vocabulary[i] for i in ids][-spec.max_tokens:]
            if self.fail_on is not None and self.fail_on in words:
                results.append(ValueError(f"echo engine refuses {self.fail_on!r}"))
                continue
            self.tokens_estimate += len(words) * spec.n
            self.prompt_tokens_seen += len(ids)
            completions = [Completion(" ".join(words), "length" if len(words) == spec.max_tokens else "stop",
                                      len(words), n) for n in range(spec.n)]
            results.append(Generation(len(ids), completions))
        return results
