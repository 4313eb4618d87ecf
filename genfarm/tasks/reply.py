"""Reply task: a customer's ticket (a `text` column) or a conversation (a column of {role, content} messages, with
`task.conversation`) -> the support agent's next reply, following a policy / knowledge text, in a tone, length and
language.

`task.policy` is the text itself or the path of a .md/.txt file, read when the job file is loaded (so the manifest
holds the policy the replies followed, and a changed policy is a changed job). It goes first in every prompt, so
rows share it as a cached prefix. A row's `language`, `tone` and `length` columns win over the job's; the reply is
checked to be in the language asked for (quality.language), when one is asked for: without one, the model is told
to answer in the customer's language, which is not checked. The `reply` column is the answer with
`task.signature` appended (the model is then told not to sign); `output_text` stays what the model wrote.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, Field, field_validator

from genfarm.quality import Hints
from genfarm.rows import Prompt, RowError, chat, text_field
from genfarm.serve.patterns import NOT_BLANK, any_case_of, branches, stripped
from genfarm.serve.protocol import SamplingParams, Usage
from genfarm.task import MappedTaskConfig, Online, Route, Task
from genfarm.translation import languages

SYSTEM = ("You are a customer support agent{company}. You answer the customer helpfully and accurately, you only "
          "promise what the support policy allows, and you never invent order details, prices or dates.")
POLICY_FILE = re.compile(r"^\S+\.(?:md|markdown|txt|rst)$", re.IGNORECASE)
CUSTOMER, AGENT = "Customer", "Agent"
ROLES = {"user": CUSTOMER, "customer": CUSTOMER, "assistant": AGENT, "agent": AGENT, "support": AGENT,
         "system": "Internal note", "note": "Internal note"}


def load_policy(value: str | None) -> str | None:
    """The policy text: `value` itself, or the contents of the file it names (one line, no spaces, .md/.txt)."""
    if value is None:
        return None
    if POLICY_FILE.match(value.strip()):
        path = Path(value.strip())
        if not path.is_file():
            raise ValueError(f"policy file {value.strip()} not found. Fix: give its path from the folder genfarm "
                             "runs in, or write the policy text itself")
        value = path.read_text(encoding="utf-8")
    if not value.strip():
        raise ValueError("the policy is empty. Fix: write the policy (or a .md/.txt path), or leave task.policy out")
    return value.strip()


def language_code(value: str | None) -> str | None:
    """A job-wide language as a BCP 47 code, from a code or an English name; a typo is the job file's error."""
    if value is None:
        return None
    try:
        return languages.to_code(value)
    except languages.UnknownLanguage as err:
        raise ValueError(f"{err}. Fix: use a code such as en, de or pt-BR, or an English name such as German") \
            from None


def wanted_language(row: dict, columns: dict[str, str], default: str | None) -> tuple[str | None, str | None]:
    """(name for the prompt, BCP 47 code for the quality check) of the language a row's text should be in: the
    row's `language` column, else the job's; (None, None) when neither names one. A language genfarm does not know
    is passed to the model as written and not checked."""
    if row.get(columns.get("language", "language")) is None and default is None:
        return None, None
    value = text_field(row, "language", columns, default)
    try:
        code = languages.to_code(value)
    except languages.UnknownLanguage:
        return value.strip(), None
    return languages.name(code), code


def transcript(value, column: str) -> str:
    """A conversation column (a list of {role, content}, or that list as JSON text) as 'Customer: ...' lines."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError("bad_type", f"column {column!r} should be a list of {{role, content}} messages, got "
                           "text that is not JSON") from None
    if value is None:
        raise RowError("missing_field", f"column {column!r} is missing or null")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RowError("bad_type", f"column {column!r} should be a list of {{role, content}} messages, got "
                       f"{type(value).__name__}")
    lines = []
    for n, message in enumerate(value):
        role, content = str(message.get("role") or "").strip().lower(), message.get("content")
        if role not in ROLES:
            raise RowError("bad_type", f"column {column!r}: message {n} has role {message.get('role')!r}; use "
                           "user (or customer), assistant (or agent) or system")
        if content is not None and not isinstance(content, str):
            raise RowError("bad_type", f"column {column!r}: message {n}'s content should be text")
        if content and content.strip():
            lines.append(f"{ROLES[role]}: {content.strip()}")
    if not any(line.startswith(f"{CUSTOMER}:") for line in lines):
        raise RowError("empty_prompt", f"column {column!r} has no customer message")
    return "\n\n".join(lines)


class ReplyConfig(MappedTaskConfig):
    type: Literal["reply"]
    menu_order = 50
    policy: str | None = Field(None, description="What the agent knows and may promise: the text itself, or the "
                               "path of a .md/.txt file (no spaces), read when the job file is loaded.")
    company: str | None = Field(None, description="The company the agent answers for, named to the model.")
    tone: str = Field("friendly, clear and professional", description="Job-wide tone; a row's `tone` column wins.")
    length: str = Field("under 120 words", description="Job-wide length; a row's `length` column wins.")
    language: str | None = Field(None, description="Language of the replies (code or English name); a row's "
                                 "`language` column wins; default: the customer's (not checked).")
    conversation: bool = Field(False, description="Read a column of chat messages [{role, content}] (`messages`, "
                               "or task.columns.messages) instead of a text column.")
    signature: str | None = Field(None, description="Appended to every reply in the `reply` column; the model is "
                                  "told not to sign.")

    _policy = field_validator("policy")(load_policy)
    _language = field_validator("language")(language_code)


class ReplyMessage(BaseModel):
    role: str = Field(description="user (or customer), assistant (or agent), or system (an internal note)")
    content: str


class ReplyRequest(SamplingParams):
    text: str | None = Field(None, min_length=1, description="The customer's message (or give `messages`).")
    messages: list[ReplyMessage] | None = Field(None, min_length=1, description="The conversation so far.")
    language: str | None = Field(None, description="Language of the reply; default: the serve config's "
                                 "tasks.reply.language, else the customer's.")
    tone: str | None = None
    length: str | None = None
    model: str | None = None


class ReplyResponse(BaseModel):
    id: str
    object: Literal["reply"] = "reply"
    model: str
    reply: str = Field(description="The reply, with the configured signature.")
    text: str = Field(description="What the model wrote.")
    language: str | None
    finish_reason: str | None
    usage: Usage


class Reply(Task):
    Config = ReplyConfig
    route = Route("/v1/replies", ReplyRequest, ReplyResponse,
                  "Answer a customer's message or conversation (the batch `reply` task)")
    output_columns = {"reply": pa.string()}
    quality_defaults = {"language": True, "min_words": 5}
    trimmable = True
    config: ReplyConfig

    @classmethod
    def describe_request(cls, schema: dict, config: ReplyConfig) -> None:
        """`text` or `messages`, one of them; messages with the roles `transcript` takes, one of them a customer's
        message that is not blank."""
        props = schema["properties"]
        schema["oneOf"] = [{"required": [name], "properties": {name: {"type": kind}}}
                           for name, kind in (("text", "string"), ("messages", "array"))]
        role = stripped(any_case_of(ROLES))
        customer = stripped(any_case_of(name for name, said in ROLES.items() if said == CUSTOMER))
        for branch in branches(props["messages"], "array"):
            # (the message model is a $ref to the shared components: its role is narrowed here, where used)
            branch["items"] = {"allOf": [branch["items"], {"properties": {"role": {"pattern": role}}}]}
            branch["contains"] = {"required": ["role", "content"],
                                  "properties": {"role": {"pattern": customer}, "content": {"pattern": NOT_BLANK}}}

    @property
    def field(self) -> str:
        return "messages" if self.config.conversation else "text"

    def required_columns(self) -> list[str]:
        return [self.config.columns.get(self.field, self.field)]

    def customer(self, row: dict) -> str:
        """The customer's side, as the prompt shows it."""
        if self.config.conversation:
            column = self.config.columns.get("messages", "messages")
            return f"The conversation so far:\n{transcript(row.get(column), column)}"
        return f"The customer's message:\n{text_field(row, 'text', self.config.columns).strip()}"

    def prompt(self, row: dict) -> Prompt:
        c = self.config
        customer = self.customer(row)
        tone, length = (text_field(row, name, c.columns, getattr(c, name)) for name in ("tone", "length"))
        language, _ = wanted_language(row, c.columns, c.language)
        parts = [f"Support policy:\n{c.policy}"] if c.policy else []
        parts.append(customer)
        parts.append(
            f"Write the support agent's next reply to the customer. Tone: {tone}. Length: {length}. "
            + (f"Write it in {language}. " if language else "Write it in the language the customer wrote in. ")
            + ("Follow the policy; where it does not answer the question, say that a colleague will follow up. "
               if c.policy else "")
            + "Never write placeholders in brackets such as [Name]. "
            + ("Do not sign it: a signature is added." if c.signature else "End with a short sign-off."))
        system = c.system_prompt or SYSTEM.format(company=f" for {c.company}" if c.company else "")
        return chat(system, "\n\n".join(parts))

    def parse(self, row: dict, text: str) -> dict:
        reply = text.strip()
        if reply and self.config.signature:
            reply = f"{reply}\n\n{self.config.signature.strip()}"
        return {"reply": reply}

    def hints(self, row: dict) -> Hints:
        """The reply should be in the language asked for (none asked for: not checked)."""
        try:
            return Hints(language=wanted_language(row, self.config.columns, self.config.language)[1])
        except RowError:
            return Hints()

    async def respond(self, row: dict, online: Online) -> ReplyResponse:
        if ("text" in row) == ("messages" in row):
            raise online.reject("give the customer's message as `text` or the conversation as `messages`, one of "
                                "them", param="text")
        request = Reply(self.config.model_copy(update={"columns": {}, "conversation": "messages" in row}))
        return await Task.respond(request, {**row, "language": row.get("language", self.config.language)}, online)
