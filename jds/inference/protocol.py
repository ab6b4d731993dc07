"""OpenAI request bodies for ``jds serve``, as pydantic models, and the error they give.

Each request is validated strictly (``"stream": "yes"`` or ``"max_tokens": 1.5`` is a 400
naming the field, as a field OpenAI does not define is: "Unrecognized request argument
supplied"). What jds does with each OpenAI field:

* built: ``model`` (must be the served model's id when given), ``prompt`` (a string, a
  list of token ids, or a list of several of either), ``messages``, ``max_tokens`` /
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``n`` (several choices; they share
  the prompt's KV blocks through prefix caching), ``logprobs`` / ``top_logprobs``,
  ``echo``, ``seed`` (absent: a fresh random seed per request, as OpenAI), ``stop``,
  ``stream``, ``stream_options.include_usage``, ``presence_penalty`` /
  ``frequency_penalty`` (over the generated tokens) and ``logit_bias``
  (``jds/inference/sampling.py``); jds's (and vLLM's) ``top_k`` and ``stop_token_ids``.
* accepted and ignored (they do not change the answer): ``user``, ``metadata``, ``store``,
  ``service_tier``, ``safety_identifier``, ``prompt_cache_key``, ``prompt_cache_retention``,
  ``parallel_tool_calls``, ``reasoning_effort``, ``verbosity``.
* refused with a 400 naming the field unless at their "off" value: ``best_of`` above ``n``,
  ``suffix``, ``tools`` /
  ``tool_choice`` / ``functions`` / ``function_call``, ``response_format`` other than text,
  ``audio``, ``modalities`` other than text, ``prediction``, ``web_search_options``;
  ``echo`` together with ``logprobs`` (prompt log-probabilities are not computed).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class BadRequest(ValueError):
    """A request the server refuses with a 4xx (the message names the field)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        """OpenAI's error body."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted: jds adds no obfuscation field


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; content is a string or a list of text parts (images are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # accepted, ignored (they do not change the answer)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    # refused unless off
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    # jds's own: extra variables for the chat template (as vLLM's chat_template_kwargs)
    chat_template_kwargs: dict[str, Any] | None = None


def _refuse(name: str, what: str, off: Any) -> BadRequest:
    return BadRequest(f"'{name}' is not supported by jds serve ({what}); leave it out or send "
                      f"{off!r}", param=name)


def check_unsupported(req: CompletionRequest | ChatRequest) -> None:
    """Refuse the fields jds does not implement unless they are at their "off" value."""
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit() or not -100 <= value <= 100:
            raise BadRequest(f"'logit_bias' maps token ids to values in [-100, 100]; got "
                             f"{key!r}: {value!r}", param="logit_bias")
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of > req.n:
            raise _refuse("best_of", "several candidates ranked by likelihood", req.n)
        if req.suffix:
            raise _refuse("suffix", "text after the completion", None)
        if req.echo and req.logprobs is not None:
            raise BadRequest("'echo' with 'logprobs' asks for the prompt's log-probabilities, "
                             "which jds serve does not compute; send one of them",
                             param="echo")
        return
    if req.tools or req.functions:
        raise _refuse("tools" if req.tools else "functions", "tool calls", None)
    if req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
        raise _refuse("tool_choice" if req.tool_choice not in (None, "none")
                      else "function_call", "tool calls", "none")
    if req.response_format and req.response_format.get("type") != "text":
        raise _refuse("response_format", "structured output", {"type": "text"})
    if req.audio is not None:
        raise _refuse("audio", "audio output", None)
    if req.modalities not in (None, ["text"]):
        raise _refuse("modalities", "output other than text", ["text"])
    if req.prediction is not None:
        raise _refuse("prediction", "predicted outputs", None)
    if req.web_search_options is not None:
        raise _refuse("web_search_options", "web search", None)


def parse(model: type[_Strict], body: Any) -> Any:
    """``body`` validated as ``model``; a ``BadRequest`` naming the first bad field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # pydantic's location holds union-member tags ("str", "list[int]", ...): drop them
        path = [x for x in err["loc"] if isinstance(x, int) or (
            x.isidentifier() and x not in ("str", "int", "float", "bool", "list", "dict"))]
        loc = ".".join(str(x) for x in path)
        got = err.get("input")
        if path[:1] == ["prompt"] and err["type"] != "missing":
            raise BadRequest("'prompt' must be a string, a list of token ids, or a list of "
                             f"several of either; got {got!r}"[:500], param="prompt") from None
        if path[-1:] == ["content"] and path[:1] == ["messages"]:
            raise BadRequest(f"'{loc}' must be a string or a list of text parts "
                             '({"type": "text", "text": ...}); images, audio and files are '
                             "not supported", param=loc) from None
        if err["type"] == "extra_forbidden":
            raise BadRequest(f"Unrecognized request argument supplied: {loc}",
                             param=loc) from None
        if err["type"] == "missing":
            raise BadRequest(f"'{loc}' is required", param=loc) from None
        raise BadRequest(f"'{loc}': {err['msg']}; got {got!r}"[:500], param=loc) from None
    check_unsupported(req)
    return req


__all__ = ["BadRequest", "ChatMessage", "ChatRequest", "CompletionRequest", "parse"]
