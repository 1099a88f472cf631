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

Some APIs refuse what others take. An HTTP 400 whose error names ``n`` ("Unsupported value: 'n' ...")
makes the generator ask for one sample per call from then on (logged once; the top-up path collects
the K samples); one that names the token-limit field sent ("Unsupported parameter: 'max_tokens' ...
Use 'max_completion_tokens' instead") switches to the other field (``token_param``) for the rest of the
run, once. The call that met the 400 is sent again at once, and counts as no retry.

Reasoning models: the reasoning a server sends apart from the answer (``message.reasoning_content``:
older vLLM, DeepSeek, SGLang; ``message.reasoning``: newer vLLM, OpenRouter and others) or inside
the text as ``<think>...</think>`` (llama.cpp without a reasoning format, and any server without a
reasoning parser; a lone ``</think>`` means the chat template opened the tag) becomes
``Sample.reasoning``, and ``Sample.text`` is the answer after it. ``usage`` (prompt, completion and
``completion_tokens_details.reasoning_tokens``) is split over the choices of its response; without a
reasoning count, the reasoning's share of the completion tokens is estimated from its length.

Fail fast: until a server has given one HTTP answer (any status but 404), a call it refuses at connect
time (nothing listens on the port, an unknown host, a connect timeout) or answers 404 (``/v1`` missing
from ``base_url``, a model it does not serve) counts against it. When every server has met
:data:`FAIL_FAST_ATTEMPTS` such calls, or every request of a batch failed that way, ``generate`` raises
a :class:`ServerUnreachable` (a ``UserError``) naming the URL and the likely fix, and stops the calls
in flight, before anything is stored. A server that has answered once is never judged this way again:
it keeps the per-request retries above.

``base_url`` is the API root including the version (``http://host:8000/v1``), as for the OpenAI
client. Several base URLs spread requests round-robin; one that fails is skipped for a cool-down that
grows with its consecutive failures, and tried again after it.

The API key is read from the environment variable that ``api_key_env`` names. It is sent only in the
``Authorization`` header and redacted from every error message; it is never in a repr or the stats.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import httpx
from tqdm.auto import tqdm

from ..config import OpenAIGeneratorConfig
from ..errors import UserError
from .base import GenerationStats, Request, Sample
from .openai_servers import (  # importable from here too, as before the split
    ServerPool,
    backoff_delay,
    normalize_base_urls,
    parse_retry_after,
    read_api_key,
)
from .openai_wire import (  # noqa: F401  (re-exported: the wire format's names, as before the split)
    THINK_CLOSE,
    THINK_OPEN,
    MalformedResponse,
    build_payload,
    error_text,
    parse_choices,
    rejected_parameter,
    rough_token_count,
    split_think,
)

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429})
FAIL_FAST_ATTEMPTS = 3  # calls refused (or 404) at a server that never answered, before the stage stops
TOKEN_PARAMS = ("max_tokens", "max_completion_tokens")


# ---------------------------------------------------------------------------------------------
# errors


class ServerUnreachable(UserError):
    """No configured server has answered: every call was refused, or answered 404."""


# ---------------------------------------------------------------------------------------------
# the generator


@dataclass
class _Attempt:
    """What one HTTP call gave: samples, or an error that may be worth retrying.

    ``answered``: the server gave an HTTP answer (any status but 404), so it is up; ``dead``: the call
    was refused at connect time or answered 404 (what an unreachable or misaddressed server does);
    ``switched``: the server refused a parameter the generator has now changed, so the call is sent again.
    """

    samples: list[Sample]
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    answered: bool = False
    dead: str | None = None
    switched: bool = False


class OpenAIGenerator:
    """``generate(requests)`` against OpenAI-compatible servers, ``max_concurrency`` calls at a time.

    ``stats.requests`` counts requests (questions), not HTTP calls; ``stats.extra["http_calls"]``
    counts calls, ``stats.retries`` the failed calls that were retried, ``stats.samples`` the samples
    without error; the token counts are those of the samples kept. ``sleep``, ``clock`` and ``rng`` are
    injectable so tests need not wait (by default a backoff wait ends early when the stage is stopped).
    """

    def __init__(
        self,
        cfg: OpenAIGeneratorConfig,
        *,
        sleep: Callable[[float], Any] | None = None,
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
        self.config_section = "generator"  # the config section errors name (build_generator sets teacher/student)
        self.stats = GenerationStats()
        self._pool = ServerPool(self.base_urls, cfg.backoff_base, cfg.backoff_max, clock)
        self._stop = threading.Event()  # set when the stage stops: workers end, backoff waits return
        self._sleep, self._rng = sleep or self._stop.wait, rng or random.Random()
        self._stats_lock = threading.Lock()
        # what the servers turned out to refuse, remembered for the run
        self._quirk_lock = threading.Lock()
        self._one_per_call = False
        self._token_param: str = cfg.token_param
        self._token_switched = False
        # fail fast: servers that answered, and the refused / 404 calls of those that have not
        self._answered: set[str] = set()
        self._dead: dict[str, list[str]] = {u: [] for u in self.base_urls}

    def __repr__(self) -> str:
        return (
            f"OpenAIGenerator(model={self.model!r}, base_url={self.base_urls!r}, endpoint={self.cfg.endpoint!r}, "
            f"api_key_env={self.cfg.api_key_env!r})"
        )

    @property
    def one_sample_per_call(self) -> bool:
        """True once a server refused ``n > 1``: every call then asks for one sample."""
        return self._one_per_call

    @property
    def token_param(self) -> str:
        """The field that carries the token limit now (``cfg.token_param``, or the other after a refusal)."""
        return self._token_param

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
                try:
                    for fut in as_completed(futures):
                        results[futures[fut]] = fut.result()
                        bar.update(1)
                except BaseException:  # an unreachable server (or Ctrl-C): stop the other calls at once
                    self._stop.set()
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
            if not self._answered and all(s.failed for r in results for s in r) and any(self._dead.values()):
                # a batch too small to reach the count: every request failed, and no server ever answered
                raise ServerUnreachable(self._unreachable_message())
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
            if self._stop.is_set():
                error = "the stage was stopped"
                break
            need = req.n - len(samples)
            seed = None if req.seed is None else req.seed + len(samples)
            server = self._pool.pick()
            got = self._attempt(client, server, req, 1 if self._one_per_call else need, seed)
            self._judge(server, got)  # raises ServerUnreachable when no server can be reached
            if got.switched:  # sent again at once with what the server takes: neither a stall nor a retry
                continue
            if got.samples:
                self._pool.mark_ok(server)
                kept = got.samples[:need]
                samples.extend(kept)
                self._add("samples", len(kept))
                self._add("completion_tokens", sum(s.num_tokens for s in kept))
                self._add("reasoning_tokens", sum(s.reasoning_tokens for s in kept))
                self._add("prompt_tokens", sum(s.prompt_tokens or 0 for s in kept))
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
            if not self._stop.is_set():
                logger.warning("%s: request %s failed: %s", self.name, req.key, error)
            samples.extend(Sample(text="", error=error) for _ in range(req.n - len(samples)))
        return samples

    def _attempt(self, client: httpx.Client, server: str, req: Request, n: int, seed: int | None) -> _Attempt:
        """One HTTP call; classifies every failure as retryable or not, with a key-free message."""
        path = "chat/completions" if self.cfg.endpoint == "chat" else "completions"
        url = f"{server}/{path}"
        payload = build_payload(req, self.model, self.cfg.endpoint, n, seed, self.cfg.stop, self._token_param)
        self._add_extra("http_calls")
        try:
            resp = client.post(url, json=payload)
        except httpx.ConnectTimeout:
            return _Attempt([], f"connect timeout after {self.cfg.timeout:g}s to {url}", retryable=True,
                            dead=f"no connection within {self.cfg.timeout:g}s")
        except httpx.TimeoutException:
            return _Attempt([], f"timeout after {self.cfg.timeout:g}s from {url}", retryable=True)
        except httpx.ConnectError as e:
            text = self._redact(f"connection error with {url}: {type(e).__name__}: {e}")
            return _Attempt([], text, retryable=True, dead=self._redact(f"{type(e).__name__}: {e}"))
        except httpx.TransportError as e:
            return _Attempt([], self._redact(f"connection error with {url}: {type(e).__name__}: {e}"), retryable=True)
        code = resp.status_code
        if code == 404:
            text = self._redact(resp.text[:300])
            return _Attempt([], f"HTTP 404 from {url}: {text}", retryable=False, dead=f"HTTP 404 {text[:120]}".strip())
        if code in RETRYABLE_STATUS or code >= 500:
            after = parse_retry_after(resp.headers.get("retry-after"))
            return _Attempt([], f"HTTP {code} from {url}", retryable=True, retry_after=after, answered=True)
        if not 200 <= code < 300:
            if code in (400, 422):
                changed = self._adapt(payload, resp.text, server)
                if changed:
                    return _Attempt([], f"HTTP {code} from {url}: {changed}", answered=True, switched=True)
            return _Attempt([], self._redact(f"HTTP {code} from {url}: {resp.text[:300]}"), retryable=False,
                            answered=True)
        try:
            samples = parse_choices(resp.json(), self.cfg.endpoint)
        except ValueError as e:  # JSON decoding, UTF-8 decoding, or shape
            return _Attempt([], f"malformed response from {url}: {type(e).__name__}: {str(e)[:200]}", retryable=True,
                            answered=True)
        return _Attempt(samples, answered=True)

    # -- what servers refuse

    def _adapt(self, payload: dict[str, Any], body: str, server: str) -> str | None:
        """After a 400 naming a parameter the server does not take, change it for the rest of the run.

        Returns what changed (the call is then sent again), or None when nothing can change: the error is
        the caller's. Each change is logged once; a call that was sent before another thread changed the
        setting is simply sent again.
        """
        with self._quirk_lock:
            if int(payload.get("n", 1)) > 1 and rejected_parameter(body, "n"):
                if not self._one_per_call:
                    self._one_per_call = True
                    logger.warning(
                        "%s: %s does not take n > 1 (HTTP 400: %s); asking for one sample per request from now on",
                        self.name, server, self._redact(error_text(body)[0][:200]))
                return "n > 1 refused; one sample per request from now on"
            sent = next(p for p in TOKEN_PARAMS if p in payload)
            if rejected_parameter(body, sent):
                other = TOKEN_PARAMS[1 - TOKEN_PARAMS.index(sent)]
                if self._token_param == other:
                    return f"{sent} refused; {other} already in use"
                if not self._token_switched:
                    self._token_switched = True
                    self._token_param = other
                    logger.warning("%s: %s does not take %s (HTTP 400: %s); sending %s from now on",
                                   self.name, server, sent, self._redact(error_text(body)[0][:200]), other)
                    return f"{sent} refused; {other} from now on"
        return None

    # -- fail fast

    def _judge(self, server: str, got: _Attempt) -> None:
        """Count a refused or 404 call at a server that never answered; stop when no server can be reached."""
        with self._stats_lock:
            if got.answered:
                self._answered.add(server)
                return
            if got.dead is None or server in self._answered:
                return
            self._dead[server].append(got.dead)
            if self._answered or any(len(v) < FAIL_FAST_ATTEMPTS for v in self._dead.values()):
                return
            self._stop.set()
        raise ServerUnreachable(self._unreachable_message())

    def _unreachable_message(self) -> str:
        """One line: each server, what it did, and the likely fix."""
        path = "chat/completions" if self.cfg.endpoint == "chat" else "completions"
        parts = []
        for u in self.base_urls:
            seen = self._dead.get(u) or []
            if not seen:
                continue
            last = seen[-1]
            calls = f"{len(seen)} call{'s' if len(seen) > 1 else ''}"
            split = urlsplit(u)
            if last.startswith("HTTP 404"):
                if not re.search(r"/v\d+[\w.-]*$", split.path):
                    hint = f"base_url is the API root with its version: {u}/v1"
                else:
                    hint = (f"check {self.config_section}.model ({self.model!r}: is it a model this server serves? "
                            f"GET {u}/models lists them) and {self.config_section}.endpoint ({self.cfg.endpoint!r})")
                parts.append(f"POST {u}/{path} answered {last} on {calls}; {hint}")
            else:
                port = split.port or (443 if split.scheme == "https" else 80)
                parts.append(f"{u} refused {calls} ({last}): is the server started, and listening on "
                             f"{split.hostname} port {port}? (check the host and port in base_url)")
        return (f"{self.config_section}.base_url: no server answered, so the stage stopped before storing anything: "
                + "; ".join(parts) + ". Rerun the same command once the server answers")

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
