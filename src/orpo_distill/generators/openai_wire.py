"""The OpenAI wire format, as pure functions: the request body out; choices, reasoning, usage and error
bodies in. No I/O here; ``openai.py`` does the HTTP calls and retries, ``openai_servers.py`` the server bookkeeping.

Reasoning models send their reasoning apart from the answer (``message.reasoning_content``: older vLLM,
DeepSeek, SGLang; ``message.reasoning``: newer vLLM, OpenRouter and others) or inside the text as
``<think>...</think>`` (llama.cpp without a reasoning format, any server without a reasoning parser);
both become ``Sample.reasoning``, with ``Sample.text`` the answer after it.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .base import Request, Sample, render_plain


class MalformedResponse(ValueError):
    """The server answered 2xx with a body that is not an OpenAI-style completion."""


def rough_token_count(text: str) -> int:
    """About four characters per token: a stand-in when the server reports no usage."""
    return math.ceil(len(text) / 4)


def build_payload(
    request: Request, model: str, endpoint: str, n: int, seed: int | None, stop: list[str] | None,
    token_param: str = "max_tokens",
) -> dict[str, Any]:
    """The JSON body for one HTTP call asking for ``n`` choices; ``token_param`` names the field of the
    token limit (``max_tokens``, or ``max_completion_tokens`` for APIs that want it)."""
    payload: dict[str, Any] = {"model": model}
    if endpoint == "chat":
        payload["messages"] = [dict(m) for m in request.messages]
    else:
        payload["prompt"] = render_plain(request.messages)
    payload.update(n=n, temperature=request.temperature, top_p=request.top_p)
    payload[token_param] = request.max_tokens
    if seed is not None:
        payload["seed"] = seed
    if stop:
        payload["stop"] = list(stop)
    return payload


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_think(text: str) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a text that may hold ``<think>...</think>``; ``(None, text)`` without tags.

    A lone ``</think>`` (the chat template opened the tag, as DeepSeek-R1's does) ends the reasoning; a
    ``<think>`` never closed (the text was cut at max_tokens while thinking) leaves an empty answer.
    """
    close = text.find(THINK_CLOSE)
    opened = text.find(THINK_OPEN)
    if close == -1 and opened == -1:
        return None, text
    if close == -1:
        return text[opened + len(THINK_OPEN):].strip(), text[:opened].strip()
    if opened == -1 or opened > close:
        return text[:close].strip(), text[close + len(THINK_CLOSE):].strip()
    reasoning = text[opened + len(THINK_OPEN): close].strip()
    return reasoning, (text[:opened] + text[close + len(THINK_CLOSE):]).strip()


def _reasoning_field(obj: dict[str, Any]) -> str | None:
    """The reasoning a server sent apart from the answer: ``reasoning_content`` or ``reasoning``."""
    for key in ("reasoning_content", "reasoning"):
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            # some servers leave the tags in the field (<think>...</think>)
            return value.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip() or None
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _spread(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` as evenly as integers allow (the remainder to the first ones)."""
    q, r = divmod(total, parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def parse_choices(body: Any, endpoint: str) -> list[Sample]:
    """Samples from a completion body; raises :class:`MalformedResponse` when its shape is wrong.

    Each sample's ``text`` is the answer and ``reasoning`` what the server sent apart from it (or inside
    ``<think>`` tags). ``usage.completion_tokens``, ``usage.prompt_tokens`` and
    ``usage.completion_tokens_details.reasoning_tokens`` are split evenly over the choices (remainder to
    the first ones); without completion tokens each sample gets a rough count, and without a reasoning
    count the reasoning's share is estimated from its length.
    """
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise MalformedResponse("no 'choices' list in the response")
    texts: list[str] = []
    thoughts: list[str | None] = []
    reasons: list[str | None] = []
    for choice in body["choices"]:
        if not isinstance(choice, dict):
            raise MalformedResponse("a choice is not an object")
        if endpoint == "chat":
            message = choice.get("message")
            if not isinstance(message, dict):
                raise MalformedResponse("a chat choice has no 'message' object")
            content = message.get("content")
            source = message
        else:
            content = choice.get("text")
            source = choice
        if content is not None and not isinstance(content, str):
            raise MalformedResponse("a choice's content is not a string")
        content = content or ""
        reasoning = _reasoning_field(source)
        if reasoning is None:
            reasoning, content = split_think(content)
            reasoning = reasoning or None
        texts.append(content)
        thoughts.append(reasoning)
        reason = choice.get("finish_reason")
        reasons.append(reason if isinstance(reason, str) else None)
    if not texts:
        return []
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    total = _count(usage.get("completion_tokens"))
    if total is not None:
        counts = _spread(total, len(texts))
    else:
        counts = [rough_token_count(t + (r or "")) for t, r in zip(texts, thoughts)]
    prompt = _count(usage.get("prompt_tokens"))
    prompts: list[int | None] = _spread(prompt, len(texts)) if prompt is not None else [None] * len(texts)
    details = usage.get("completion_tokens_details")
    reported = _count(details.get("reasoning_tokens")) if isinstance(details, dict) else None
    if reported is not None:
        thinking = _spread(reported, len(texts))
    else:  # the reasoning's share of the sample's tokens, by length
        thinking = [round(c * len(r) / (len(r) + len(t))) if r else 0 for c, t, r in zip(counts, texts, thoughts)]
    return [Sample(text=t, num_tokens=c, finish_reason=f, reasoning=r, reasoning_tokens=k, prompt_tokens=p)
            for t, c, f, r, k, p in zip(texts, counts, reasons, thoughts, thinking, prompts)]


_REFUSES = re.compile(
    r"unsupported|not supported|does not support|not allowed|not permitted|unrecogni[sz]ed|unknown (?:parameter|"
    r"field|argument)|extra (?:fields|inputs)|must (?:be|equal) (?:at most )?1\b|at most 1\b|only (?:the default|one|1)\b|"
    r"\binstead\b", re.I)


def error_text(raw: str) -> tuple[str, str | None]:
    """``(message, param)`` of an error body (OpenAI's ``{"error": {...}}``, vLLM's older flat one, or text)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw, None
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        param = err.get("param")
        parts = [str(err.get(k)) for k in ("message", "code", "type", "detail") if err.get(k) is not None]
        return " ".join(parts) or raw, param if isinstance(param, str) else None
    return (err if isinstance(err, str) else raw), None


def rejected_parameter(raw: str, name: str) -> bool:
    """Whether a 400 body says the request field ``name`` is not supported (or only as 1, for ``n``).

    A body whose ``param`` is ``name`` with an "unsupported" code or wording, or whose message names
    ``name`` as a word together with such wording. "'max_tokens' ... is too large" is not a refusal of
    the field, and does not count.
    """
    message, param = error_text(raw)
    if not _REFUSES.search(message):
        return False
    if param == name:
        return True
    return re.search(rf"(?<![\w\\.]){re.escape(name)}(?![\w])", message) is not None
