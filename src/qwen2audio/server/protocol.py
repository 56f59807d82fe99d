"""Request schemas of the OpenAI API subset we serve (pydantic), and the error body shape.

Owns validation of what clients send, field by field, as the OpenAI API reference defines it (vLLM's
extensions where OpenAI is silent); responses are plain dicts built in server/responses.py.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qwen2audio.engine.request import MAX_TEMPERATURE

INT64 = (-(2**63), 2**63 - 1)  # seeds: what a 64-bit generator takes (vLLM's range)
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; vLLM any number)
MAX_LOGIT_BIAS = 300  # tokens per request: the bias is applied every step, so one request must not slow all
TOKEN_ID = re.compile(r"[0-9]{1,9}")  # ASCII digits only ("²".isdigit() is true, int("²") fails)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, metadata, ...)

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=INT64[0], le=INT64[1])
    stop: str | list[str] | None = Field(default=None)
    n: int = Field(default=1, ge=1, le=128)  # as OpenAI; --max-pending still bounds the work (429)
    # extensions, as vLLM names them
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int = Field(default=0, ge=0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)  # OpenAI: a number or null
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> [-100, 100]
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        bias = self.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens")
        if any(not TOKEN_ID.fullmatch(key) or not -100.0 <= value <= 100.0 for key, value in bias.items()):
            raise ValueError("logit_bias maps token ids (non-negative integers) to values in [-100, 100]")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValueError(f"response_format {self.response_format.get('type')!r} is not supported (this server "
                             f"has no guided decoding); only 'text'")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP or any(not s or len(s) > 1000 for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings of at most 1000 characters")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def biases(self) -> dict[int, float]:
        return {int(key): value for key, value in (self.logit_bias or {}).items()}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.tools:
            raise ValueError("tools are not supported (Qwen2-Audio has no tool calling)")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice needs tools, and tools are not supported")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    # A string, a list of token ids, or a list of either (one completion each, n choices per prompt).
    prompt: str | list[int] | list[str | list[int]]
    audio: list[str] = Field(default_factory=list)  # extension: one source per <|AUDIO|>, in order
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported (Qwen2-Audio has no fill-in-the-middle)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (prompt logprobs are not computed)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)

    @property
    def limit(self) -> int | None:
        return self.max_tokens


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class LoadLoraRequest(BaseModel):
    """vLLM's body for POST /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    """vLLM's body for POST /v1/unload_lora_adapter (its lora_int_id is accepted and not needed)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None
