"""Generator for any OpenAI-compatible HTTP server: vLLM, SGLang, llama.cpp, Ollama, hosted APIs.

Teacher traces cost money and time, so one bad request must never cost the run: every request is
retried with exponential backoff and jitter on rate limits (429, honouring ``Retry-After``), request
timeouts (408), server errors (5xx), client timeouts, connection errors and malformed bodies, and
gives up *per request* after ``max_retries``; a request that gave up yields samples with ``error``
set and counts in ``stats.failed_requests``. Other 4xx statuses (bad request, bad key, unknown model)
are the caller's fault and are not retried.

Servers differ in what they honour: llama.cpp's server ignores ``n``, so when fewer choices come back
than asked for, the missing ones are requested again (the seed, when set, is offset by the number of
samples already held so the top-up is not a copy). A choice with empty or null content is kept as a
sample with text ``""``: the server did answer, and the empty text simply fails answer extraction.

``base_url`` is the API root including the version (``http://host:8000/v1``), as for the OpenAI
client. Several base URLs spread requests round-robin; one that fails is skipped for a cool-down that
grows with its consecutive failures, and tried again after it.

The API key is read from the environment variable that ``api_key_env`` names. It is sent only in the
``Authorization`` header and redacted from every error message; it is never in a repr or the stats.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import httpx
from tqdm.auto import tqdm

from ..config import GeneratorConfig
from ..errors import UserError
from .base import GenerationStats, Request, Sample, render_plain

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429})


# ---------------------------------------------------------------------------------------------
# pure helpers


class MalformedResponse(ValueError):
    """The server answered 2xx with a body that is not an OpenAI-style completion."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header in its seconds form; ``None`` when absent or a date."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def backoff_delay(
    attempt: int, base: float, cap: float, retry_after: float | None = None, rng: random.Random | None = None
) -> float:
    """Delay before retry number ``attempt`` (0-based): ``base * 2**attempt`` with jitter, capped.

    The jitter (a factor in [0.5, 1]) keeps many workers that failed together from retrying together.
    A server's ``Retry-After`` is a floor, but never beyond ``cap``: a server asking for an hour must
    not stall the run.
    """
    rng = rng or random
    delay = min(cap, base * (2.0 ** min(attempt, 60))) * rng.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(cap, delay)


def rough_token_count(text: str) -> int:
    """About four characters per token: a stand-in when the server reports no usage."""
    return math.ceil(len(text) / 4)


def build_payload(
    request: Request, model: str, endpoint: str, n: int, seed: int | None, stop: list[str] | None
) -> dict[str, Any]:
    """The JSON body for one HTTP call asking for ``n`` choices."""
    payload: dict[str, Any] = {"model": model}
    if endpoint == "chat":
        payload["messages"] = [dict(m) for m in request.messages]
    else:
        payload["prompt"] = render_plain(request.messages)
    payload.update(n=n, temperature=request.temperature, top_p=request.top_p, max_tokens=request.max_tokens)
    if seed is not None:
        payload["seed"] = seed
    if stop:
        payload["stop"] = list(stop)
    return payload


def parse_choices(body: Any, endpoint: str) -> list[Sample]:
    """Samples from a completion body; raises :class:`MalformedResponse` when its shape is wrong.

    ``usage.completion_tokens`` is split evenly over the choices (remainder to the first ones);
    without it each sample gets a rough count.
    """
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise MalformedResponse("no 'choices' list in the response")
    texts: list[str] = []
    reasons: list[str | None] = []
    for choice in body["choices"]:
        if not isinstance(choice, dict):
            raise MalformedResponse("a choice is not an object")
        if endpoint == "chat":
            message = choice.get("message")
            if not isinstance(message, dict):
                raise MalformedResponse("a chat choice has no 'message' object")
            content = message.get("content")
        else:
            content = choice.get("text")
        if content is not None and not isinstance(content, str):
            raise MalformedResponse("a choice's content is not a string")
        texts.append(content or "")
        reason = choice.get("finish_reason")
        reasons.append(reason if isinstance(reason, str) else None)
    usage = body.get("usage")
    total = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0 and texts:
        q, r = divmod(total, len(texts))
        counts = [q + (1 if i < r else 0) for i in range(len(texts))]
    else:
        counts = [rough_token_count(t) for t in texts]
    return [Sample(text=t, num_tokens=c, finish_reason=f) for t, c, f in zip(texts, counts, reasons)]


def normalize_base_urls(base_url: str | list[str] | None) -> list[str]:
    """The configured base URL(s) as a non-empty list without trailing slashes."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url or [])
    if not urls:
        raise UserError("generator.base_url: needs at least one URL such as http://localhost:8000/v1")
    for u in urls:
        if not isinstance(u, str) or not u.startswith(("http://", "https://")):
            raise UserError(f"generator.base_url: {u!r} is not an http:// or https:// URL")
    return [u.rstrip("/") for u in urls]


def read_api_key(env_name: str | None) -> str | None:
    """The key from the environment variable ``env_name`` (``None`` when no variable is named)."""
    if not env_name:
        return None
    key = (os.environ.get(env_name) or "").strip()  # a key read from a .env file often ends in a newline
    if not key:
        raise UserError(
            f"generator.api_key_env: the environment variable {env_name} is not set or empty; "
            f"export it with the API key, or remove api_key_env for a server without keys"
        )
    if not key.isascii() or not key.isprintable():
        # an HTTP header cannot carry it, and the library's error would quote it
        raise UserError(f"generator.api_key_env: the value of {env_name} has characters an HTTP header cannot carry")
    return key


# ---------------------------------------------------------------------------------------------
# servers


class ServerPool:
    """Round-robin over base URLs; a failing server sits out a cool-down, then is tried again.

    The cool-down doubles with each consecutive failure of that server (``base``, ``2 base``, ...,
    capped at ``cap``) and is at least what its ``Retry-After`` asked for; a success clears it. When
    every server is cooling down, the one that comes back first is used rather than stalling.
    """

    def __init__(self, urls: list[str], base: float, cap: float, clock: Callable[[], float] = time.monotonic):
        self.urls = list(urls)
        self._base, self._cap, self._clock = base, cap, clock
        self._failures = {u: 0 for u in self.urls}
        self._until = {u: 0.0 for u in self.urls}
        self._next = 0
        self._lock = threading.Lock()

    def pick(self) -> str:
        with self._lock:
            now = self._clock()
            n = len(self.urls)
            order = [self.urls[(self._next + i) % n] for i in range(n)]
            chosen = next((u for u in order if self._until[u] <= now), None)
            if chosen is None:
                chosen = min(order, key=lambda u: self._until[u])
            self._next = (self.urls.index(chosen) + 1) % n
            return chosen

    def mark_failed(self, url: str, at_least: float = 0.0) -> None:
        with self._lock:
            self._failures[url] += 1
            cool = min(self._cap, self._base * 2.0 ** min(self._failures[url] - 1, 60))
            self._until[url] = self._clock() + max(cool, min(at_least, self._cap))

    def mark_ok(self, url: str) -> None:
        with self._lock:
            self._failures[url] = 0
            self._until[url] = 0.0

    def any_available(self) -> bool:
        with self._lock:
            now = self._clock()
            return any(t <= now for t in self._until.values())


# ---------------------------------------------------------------------------------------------
# the generator


@dataclass
class _Attempt:
    """What one HTTP call gave: samples, or an error that may be worth retrying."""

    samples: list[Sample]
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None


class OpenAIGenerator:
    """``generate(requests)`` against OpenAI-compatible servers, ``max_concurrency`` calls at a time.

    ``stats.requests`` counts requests (questions), not HTTP calls; ``stats.extra["http_calls"]``
    counts calls, ``stats.retries`` the failed calls that were retried, ``stats.samples`` the samples
    without error. ``sleep``, ``clock`` and ``rng`` are injectable so tests need not wait.
    """

    def __init__(
        self,
        cfg: GeneratorConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not cfg.model:
            raise UserError("generator.model: the openai generator needs the model name the server serves")
        self.cfg = cfg
        self.model: str = cfg.model
        self.base_urls = normalize_base_urls(cfg.base_url)
        self._api_key = read_api_key(cfg.api_key_env)  # before any request: fail fast
        self.name = f"openai:{cfg.model}"
        self.stats = GenerationStats()
        self._pool = ServerPool(self.base_urls, cfg.backoff_base, cfg.backoff_max, clock)
        self._sleep, self._rng = sleep, rng or random.Random()
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"OpenAIGenerator(model={self.model!r}, base_url={self.base_urls!r}, endpoint={self.cfg.endpoint!r}, "
            f"api_key_env={self.cfg.api_key_env!r})"
        )

    # -- public

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        if not requests:
            return []
        start = time.perf_counter()
        results: list[list[Sample]] = [[] for _ in requests]
        workers = min(self.cfg.max_concurrency, len(requests))
        try:
            with self._new_client(workers) as client, ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
                total=len(requests), desc=self.name, unit="req", disable=None
            ) as bar:
                futures = {pool.submit(self._run, client, req): i for i, req in enumerate(requests)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
        finally:
            self._add("seconds", time.perf_counter() - start)
        return results

    def _new_client(self, connections: int) -> httpx.Client:
        """One client per ``generate`` call: connections are reused within a batch, none held between."""
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.Client(headers=headers, timeout=httpx.Timeout(self.cfg.timeout), limits=limits)

    # -- one request

    def _run(self, client: httpx.Client, req: Request) -> list[Sample]:
        """All ``req.n`` samples for one request, topping up short answers and retrying faults."""
        self._add("requests")
        samples: list[Sample] = []
        stalls = 0  # consecutive calls that added nothing
        error = "no attempt made"
        while len(samples) < req.n:
            need = req.n - len(samples)
            seed = None if req.seed is None else req.seed + len(samples)
            server = self._pool.pick()
            got = self._attempt(client, server, req, need, seed)
            if got.samples:
                self._pool.mark_ok(server)
                kept = got.samples[:need]
                samples.extend(kept)
                self._add("samples", len(kept))
                self._add("completion_tokens", sum(s.num_tokens for s in kept))
                stalls = 0
                continue
            error = got.error or f"{server} returned no choices"
            if not got.retryable and got.error is not None:
                break
            self._pool.mark_failed(server, got.retry_after or 0.0)
            stalls += 1
            if stalls > self.cfg.max_retries:
                error = f"gave up after {stalls} attempts without progress; last error: {error}"
                break
            self._add("retries")
            logger.debug("%s: request %s: %s; retrying", self.name, req.key, error)
            if not self._pool.any_available():  # another server can take it at once
                self._sleep(
                    backoff_delay(stalls - 1, self.cfg.backoff_base, self.cfg.backoff_max, got.retry_after, self._rng)
                )
        if len(samples) < req.n:
            self._add("failed_requests")
            logger.warning("%s: request %s failed: %s", self.name, req.key, error)
            samples.extend(Sample(text="", error=error) for _ in range(req.n - len(samples)))
        return samples

    def _attempt(self, client: httpx.Client, server: str, req: Request, n: int, seed: int | None) -> _Attempt:
        """One HTTP call; classifies every failure as retryable or not, with a key-free message."""
        path = "chat/completions" if self.cfg.endpoint == "chat" else "completions"
        url = f"{server}/{path}"
        payload = build_payload(req, self.model, self.cfg.endpoint, n, seed, self.cfg.stop)
        self._add_extra("http_calls")
        try:
            resp = client.post(url, json=payload)
        except httpx.TimeoutException:
            return _Attempt([], f"timeout after {self.cfg.timeout:g}s from {url}", retryable=True)
        except httpx.TransportError as e:
            return _Attempt([], self._redact(f"connection error with {url}: {type(e).__name__}: {e}"), retryable=True)
        code = resp.status_code
        if code in RETRYABLE_STATUS or code >= 500:
            after = parse_retry_after(resp.headers.get("retry-after"))
            return _Attempt([], f"HTTP {code} from {url}", retryable=True, retry_after=after)
        if not 200 <= code < 300:
            return _Attempt([], self._redact(f"HTTP {code} from {url}: {resp.text[:300]}"), retryable=False)
        try:
            samples = parse_choices(resp.json(), self.cfg.endpoint)
        except ValueError as e:  # JSON decoding, UTF-8 decoding, or shape
            return _Attempt([], f"malformed response from {url}: {type(e).__name__}: {str(e)[:200]}", retryable=True)
        return _Attempt(samples)

    # -- bookkeeping

    def _redact(self, text: str) -> str:
        if not self._api_key:
            return text
        return text.replace(self._api_key, "***").replace(repr(self._api_key)[1:-1], "***")

    def _add(self, counter: str, amount: float = 1) -> None:
        with self._stats_lock:
            setattr(self.stats, counter, getattr(self.stats, counter) + amount)

    def _add_extra(self, counter: str, amount: int = 1) -> None:
        with self._stats_lock:
            self.stats.extra[counter] = self.stats.extra.get(counter, 0) + amount
