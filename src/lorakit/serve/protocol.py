"""The OpenAI wire format that ``lorakit serve`` speaks: request models (validated at the boundary) and the
response, stream-chunk and error bodies.

Requests follow the OpenAI API reference for ``/v1/completions`` and ``/v1/chat/completions``. Fields lorakit
does not implement are refused with a 400 naming the field when set to anything but their neutral value (``n``
other than 1, ``echo``, ``logprobs``, penalties, ``logit_bias``, ``tools``...), so a client never gets a
silently different behaviour; unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Names an adapter may be served under: the ``model`` field and the ``/v1/adapters/{name}`` path segment.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
#: At most this many stop strings per request (OpenAI allows 4; more only cost a longer search per token).
MAX_STOP = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class GenerationRequest(_Request):
    """What completions and chat completions share."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> GenerationRequest:
        if self.n not in (None, 1):
            raise ValueError(f"n={self.n}: only n=1 is supported (send several requests instead)")
        for field in ("presence_penalty", "frequency_penalty"):
            if getattr(self, field) not in (None, 0, 0.0):
                raise ValueError(f"{field} is not supported (leave it unset or 0)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        stops = self.stop_strings()
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``. ``prompt``: a string, a list of strings (one choice each), or token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_supported(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be an empty list")
        if self.echo:
            raise ValueError("echo is not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``. Without ``max_tokens`` the completion may use the rest of the context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_supported(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs is not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("response_format: only {'type': 'text'} is supported")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AdapterLoad(_Request):
    """``POST /v1/adapters``: load the adapter directory ``path`` (lorakit or PEFT) under ``name``."""

    name: str
    path: str


class VllmAdapterLoad(_Request):
    """vLLM's ``POST /v1/load_lora_adapter`` body, accepted as an alias."""

    lora_name: str
    lora_path: str


class VllmAdapterUnload(_Request):
    """vLLM's ``POST /v1/unload_lora_adapter`` body, accepted as an alias."""

    lora_name: str


# --- responses -----------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, choices: list[dict[str, Any]],
                    use: dict[str, int] | None, *, chunk: bool = False) -> dict[str, Any]:
    """A ``text_completion`` (whole, or one stream chunk); choices are ``{"index", "text", "finish_reason"}``."""
    body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                            "choices": [{"logprobs": None, **c} for c in choices]}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def chat_body(rid: str, created: int, model: str, choices: list[dict[str, Any]],
              use: dict[str, int] | None) -> dict[str, Any]:
    """A whole ``chat.completion``; choices are ``{"index", "text", "finish_reason"}``."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices],
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict[str, Any]],
               use: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; choices are ``{"index", "delta", "finish_reason"}``."""
    body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"logprobs": None, **c} for c in choices]}
    if use is not None:
        body["usage"] = use
    return body


def model_card(name: str, created: int, root: str, parent: str | None) -> dict[str, Any]:
    """One entry of ``GET /v1/models`` (``root``: where it was loaded from; ``parent``: its base model)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": root,
            "parent": parent}


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}`` (``type``:
    ``invalid_request_error`` for a 4xx, ``server_error`` for a 5xx, as OpenAI answers)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


__all__ = [
    "ADAPTER_NAME",
    "AdapterLoad",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerationRequest",
    "VllmAdapterLoad",
    "VllmAdapterUnload",
    "chat_body",
    "chat_chunk",
    "completion_body",
    "error_body",
    "model_card",
]
