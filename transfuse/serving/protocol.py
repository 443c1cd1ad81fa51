"""The OpenAI request schemas ``transfuse serve`` accepts, its error body, and chat prompts.

Requests are validated up front (pydantic), before anything reaches the engine; every
refusal is an :class:`ApiError` that the server writes as OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

What is supported: ``/v1/completions`` (``prompt`` as text, a list of texts, token ids or a
list of token-id lists) and ``/v1/chat/completions`` (text messages) with ``max_tokens``
(chat also ``max_completion_tokens``), ``temperature`` (0 = greedy), ``top_p``, ``stop``
(up to :data:`MAX_STOP` strings), ``seed``, ``stream`` and ``stream_options.include_usage``,
``presence_penalty`` / ``frequency_penalty`` (-2..2, over the generated tokens), ``logit_bias``
(token id -> -100..100), log-probabilities of the generated tokens (completions
``logprobs``: 0..5 top alternatives; chat ``logprobs: true`` with ``top_logprobs`` 0..20);
vLLM's extensions ``top_k``, ``repetition_penalty`` and ``min_tokens``. Known OpenAI fields
this server cannot honour (``best_of`` > 1, ``suffix``, tools) are refused with a 400 naming
the field, when set to anything but their neutral value; unknown fields are refused like OpenAI
does. Completions' ``echo`` puts the prompt before the completion, with ``logprobs`` also the
prompt tokens' (the first one's null), as loglikelihood evaluations (lm-eval-harness) read them;
``max_tokens: 0`` with both scores the prompt without generating. ``n`` (1..:data:`MAX_N`) choices per prompt are n engine requests (the
prompt's cached blocks shared with prefix caching); with a ``seed``, choice j samples with
``seed + j``; choices are indexed prompt by prompt (prompt i's j-th is ``i * n + j``).

Chat prompts (:func:`chat_prompt`): the tokenizer's chat template when it has one
(``apply_chat_template(..., add_generation_prompt=True)``); otherwise this plain fallback,
one line per message and an open assistant turn::

    system: You are terse.
    user: Hi!
    assistant:
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: most stop strings per request
MAX_STOP = 16
#: max_tokens when a completions request leaves it out (OpenAI's default)
DEFAULT_COMPLETION_TOKENS = 16


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# -- schemas ------------------------------------------------------------------------------------

Unit = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
#: most logit_bias entries per request
MAX_LOGIT_BIAS = 1024
#: most choices per prompt (``n``)
MAX_N = 16
TokenIds = list[Annotated[int, Field(ge=0)]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


def texts_or_ids(x: str | list) -> list[str | list[int]]:
    """A validated ``prompt`` / ``input`` (a text, texts, token ids or lists of them) as a list
    with one text or token-id list per entry."""
    if isinstance(x, str):
        return [x]
    if x and isinstance(x[0], int):
        return [list(x)]
    return list(x)


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Unit | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]],
                          Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            if not self.stop:
                raise ApiError(400, "stop: an empty string never matches; leave it out",
                               param="stop")
            return [self.stop]
        return list(self.stop)


class CompletionRequest(_Sampling):
    # 0: score the prompt only (with echo and logprobs)
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
             | Annotated[TokenIds, Field(min_length=1)]
             | Annotated[list[Annotated[TokenIds, Field(min_length=1)]], Field(min_length=1)])
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    def top_logprobs_wanted(self) -> int | None:
        """Top alternatives per token to report (None: no log-probabilities)."""
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or a list of token ids."""
        return texts_or_ids(self.prompt)


#: most inputs of one embeddings request (OpenAI's limit)
MAX_EMBED_INPUTS = 2048


class EmbeddingRequest(BaseModel):
    """``/v1/embeddings``: ``input`` a string, a list of strings, a list of token ids or a list
    of such lists; ``encoding_format`` float (JSON numbers) or base64 (little-endian float32
    bytes, what the ``openai`` client asks for by default); ``dimensions`` only as the
    model's own size (no truncation)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    input: (Annotated[str, Field(min_length=1)]
            | Annotated[list[Annotated[str, Field(min_length=1)]],
                        Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
            | Annotated[TokenIds, Field(min_length=1)]
            | Annotated[list[Annotated[TokenIds, Field(min_length=1)]],
                        Field(min_length=1, max_length=MAX_EMBED_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """One entry per vector: a text or a list of token ids."""
        return texts_or_ids(self.input)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        """Top alternatives per token to report (None: no log-probabilities)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        fmt = self.response_format
        if fmt is not None and fmt.get("type", "text") != "text":
            raise ApiError(400, f"response_format type {fmt.get('type')!r} is not supported "
                           "(only 'text')", param="response_format")


def parse_request(kind: type[BaseModel], data: Any) -> Any:
    """``kind.model_validate(data)``, refusals as a 400 ApiError naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got "
                       f"{type(data).__name__}")
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False)[0]
    loc = [str(part) for part in err["loc"]]
    # a union reports every alternative: keep the field path, drop the alternative's name
    path = [p for p in loc if not _is_alternative(p)]
    param = ".".join(path) or None
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if err["type"] == "missing":
        return ApiError(400, f"'{param}' is a required property", param=param)
    given = err.get("input")
    shown = repr(given) if len(repr(given)) <= 80 else repr(given)[:77] + "..."
    if path and path[-1] in UNION_FIELDS and len(loc) > len(path):  # an alternative failed
        return ApiError(400, f"{param} must be {UNION_FIELDS[path[-1]]} (got {shown})",
                        param=param)
    return ApiError(400, f"{param}: {err['msg']} (got {shown})", param=param)


#: what a field that takes several forms accepts, for its refusal message
UNION_FIELDS = {
    "prompt": "a non-empty string, a non-empty list of non-empty strings, a non-empty list "
              "of token ids (integers >= 0) or a non-empty list of such lists",
    "stop": f"a string or a list of at most {MAX_STOP} non-empty strings",
    "input": "a non-empty string, a non-empty list of non-empty strings, a non-empty list of "
             "token ids (integers >= 0) or a non-empty list of such lists (at most "
             f"{MAX_EMBED_INPUTS} inputs)",
    "content": "a string or a list of {'type': 'text', 'text': ...} parts",
}


def _is_alternative(part: str) -> bool:
    """A pydantic location part naming a union alternative (``str``, ``list[int]``, ...)."""
    return part in ("str", "int", "float", "bool", "none") or "[" in part or \
        part.startswith(("constrained-", "literal[", "function-"))


# -- chat prompts -------------------------------------------------------------------------------


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> tuple[str, bool]:
    """(prompt text, whether it came from the tokenizer's chat template) for ``messages``
    (module docstring). A template's text already holds its special tokens (encode it without
    adding more); the fallback's does not."""
    plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
             for m in messages]
    if getattr(tokenizer, "chat_template", None) and \
            callable(getattr(tokenizer, "apply_chat_template", None)):
        try:
            text = tokenizer.apply_chat_template(plain, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # a template may refuse a conversation (roles out of order)
            raise ApiError(400, f"the model's chat template refused the messages: {e}",
                           param="messages") from None
        return text, True
    lines = [f"{m['role']}: {m['content']}\n" for m in plain]
    return "".join(lines) + "assistant:", False


__all__ = ["ApiError", "ChatMessage", "ChatRequest", "CompletionRequest", "EmbeddingRequest",
           "DEFAULT_COMPLETION_TOKENS", "MAX_STOP", "StreamOptions", "chat_prompt",
           "parse_request", "validation_error"]
