"""Local transformers generation: batched, left-padded, length-sorted, bf16 autocast, stop at EOS.

Sampled rows are seeded one by one (``row_sampling.py``): a sample is the same at any batch size, in
any batch, under any number of processes and after a resume. Decoding is our own loop
(``decoding.py``: each prompt prefilled once for its samples, a row dropped as soon as it ends), with
``model.generate`` as the plain path for the models that loop does not cover; both give the same tokens.

The same class serves the student's sampling and the mixed-policy refresh: built from a model name
it loads the model, built with :meth:`HFGenerator.from_model` it samples from weights in memory (the
current student during training, with no reload from disk).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from ..config import HFGeneratorConfig
from ..errors import UserError
from ..models import autocast, load_model, load_tokenizer, render_prompt
from .base import GenerationStats, Request, Sample
from .decoding import decode, left_padded, unsupported_reason
from .row_sampling import RowSeededSampler

log = logging.getLogger(__name__)


def autocast_for(dtype: str) -> bool:
    """Whether a student of this ``dtype`` samples under bf16 autocast: every dtype but ``float32``, which
    asks for plain fp32, so that its samples are bit-exact at any batch shape (autocast's bf16 rounding
    can depend on it). The same rule for the first samples, the refresh and the evaluations."""
    return dtype != "float32"


class HFGenerator:
    """``bf16=False`` turns the bf16 autocast off (plain fp32 on CPU). ``decoding="fast"`` decodes with
    :func:`.decoding.decode` (each prompt prefilled once, finished rows dropped) where the model allows it,
    ``"generate"`` with ``model.generate``; both give the same tokens (the benchmark's two arms)."""

    def __init__(
        self, model: Any, tokenizer: Any, name: str, batch_size: int = 16, progress: bool = True, bf16: bool = True,
        decoding: str = "fast",
    ):
        if decoding not in ("fast", "generate"):
            raise ValueError(f"decoding must be fast or generate, not {decoding!r}")
        self.decoding = decoding
        self._fallback: str | None = None  # why the model needs generate ("" when it does not); None: not checked
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size
        self.progress = progress
        self.bf16 = bf16
        self.stats = GenerationStats()

    @classmethod
    def from_config(cls, cfg: HFGeneratorConfig, progress: bool = True) -> "HFGenerator":
        assert cfg.model is not None
        tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, device=cfg.device)
        return cls(model, tok, name=f"hf:{cfg.model}", batch_size=cfg.sampling.batch_size, progress=progress,
                   bf16=autocast_for(cfg.dtype))

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, name: str, batch_size: int = 16, progress: bool = True, bf16: bool = True,
        decoding: str = "fast",
    ) -> "HFGenerator":
        return cls(model, tokenizer, name=name, batch_size=batch_size, progress=progress, bf16=bf16, decoding=decoding)

    @classmethod
    def for_student(cls, model: Any, tokenizer: Any, dtype: str, name: str, batch_size: int,
                    progress: bool = True) -> "HFGenerator":
        """The student's weights in memory as a generator, under the student's precision rule
        (:func:`autocast_for` its ``dtype``): what the refresh, the ``student`` stage after an epoch and the
        evaluations sample with."""
        return cls.from_model(model, tokenizer, name=name, batch_size=batch_size, progress=progress,
                              bf16=autocast_for(dtype))

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        """Expand each request into ``n`` rows, sort rows by prompt length, generate in batches.

        Rows of similar length share a batch, so left padding stays small. Sampling settings must be
        the same within a batch, so rows are grouped by (temperature, top_p, max_tokens) first.
        """
        start = time.perf_counter()
        prompts = [render_prompt(self.tokenizer, r.messages) for r in requests]
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        self._check_context(requests, encoded)
        rows = [(i, j) for i, r in enumerate(requests) for j in range(r.n)]
        rows.sort(key=lambda ij: (self._settings(requests[ij[0]]), len(encoded[ij[0]])))
        out: list[list[Sample | None]] = [[None] * r.n for r in requests]
        batches = []
        for k in range(0, len(rows), self.batch_size):
            chunk = rows[k : k + self.batch_size]
            # split a chunk where the sampling settings change
            groups: dict[tuple, list] = {}
            for ij in chunk:
                groups.setdefault(self._settings(requests[ij[0]]), []).append(ij)
            batches.extend(groups.values())
        bar = tqdm(total=len(rows), desc=f"generate {self.name}", unit="sample", disable=not self.progress, leave=False)
        for batch in batches:
            texts, ntoks, reasons = self._generate_batch(batch, requests, encoded)
            for (i, j), text, nt, fr in zip(batch, texts, ntoks, reasons):
                out[i][j] = Sample(text=text, num_tokens=nt, finish_reason=fr)
            bar.update(len(batch))
            self.stats.completion_tokens += sum(ntoks)
        bar.close()
        self.stats.requests += len(requests)
        self.stats.samples += len(rows)
        self.stats.seconds += time.perf_counter() - start
        return [[s for s in samples if s is not None] for samples in out]

    def _check_context(self, requests: Sequence[Request], encoded: list[list[int]]) -> None:
        """Refuse a prompt that, with the tokens asked for, does not fit the model's context: models with
        learned positions crash on it, and the others spend quadratic memory on a text they were never
        trained to read."""
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if not isinstance(limit, int):
            return
        for r, ids in zip(requests, encoded):
            if len(ids) + r.max_tokens > limit:
                raise UserError(
                    f"question {r.key!r}: the prompt is {len(ids)} tokens and max_tokens {r.max_tokens}, more than "
                    f"the {limit}-token context of {self.name}; shorten or drop that question (or lower max_tokens)"
                )

    @staticmethod
    def _settings(r: Request) -> tuple:
        return (r.temperature, r.top_p, r.max_tokens)

    def _generate_batch(
        self, batch: list[tuple[int, int]], requests: Sequence[Request], encoded: list[list[int]]
    ) -> tuple[list[str], list[int], list[str]]:
        """Generate the rows ``(request, sample)`` of one batch (shared settings: its first request's);
        each row's tokens depend on its own seed and the weights, never on the batch it shares."""
        req = requests[batch[0][0]]
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(next(self.model.parameters()).device, enabled=self.bf16):
                if self._decoding() == "fast":
                    new = self._decode_rows(batch, requests, encoded, req)
                else:
                    new = self._generate_rows([encoded[i] for i, _ in batch], req,
                                              [requests[i].sample_seed(j) for i, j in batch])
        finally:
            self.model.train(was_training)
        eos = set(self._eos_ids())
        texts, ntoks, reasons = [], [], []
        for row in new:
            n = len(row)
            reason = "length"
            for t, tid in enumerate(row):
                if tid in eos:
                    n, reason = t, "stop"
                    break
            texts.append(self.tokenizer.decode(row[:n], skip_special_tokens=True))
            ntoks.append(n + (1 if reason == "stop" else 0))
            reasons.append(reason)
        return texts, ntoks, reasons

    def _decoding(self) -> str:
        """``fast`` (:mod:`.decoding`) unless asked for ``generate`` or the model needs it (logged once)."""
        if self.decoding == "fast" and self._fallback is None:
            self._fallback = unsupported_reason(self.model) or ""
            if self._fallback:
                log.info("%s: decoding with model.generate: %s", self.name, self._fallback)
        return "generate" if self.decoding == "generate" or self._fallback else "fast"

    def _decode_rows(
        self, batch: list[tuple[int, int]], requests: Sequence[Request], encoded: list[list[int]], req: Request
    ) -> list[list[int]]:
        """The fast path: the batch's requests prefilled once each, their samples decoded together."""
        by_request: dict[int, list[int]] = {}
        for i, j in batch:
            by_request.setdefault(i, []).append(j)
        order = list(by_request)
        samples = decode(
            self.model, [encoded[i] for i in order],
            [[requests[i].sample_seed(j) for j in by_request[i]] for i in order],
            pad_id=self.tokenizer.pad_token_id, eos_ids=self._eos_ids(), max_new_tokens=req.max_tokens,
            temperature=req.temperature, top_p=req.top_p,
        )
        found = {(i, j): row for i, rows in zip(order, samples) for j, row in zip(by_request[i], rows)}
        return [found[ij] for ij in batch]

    @torch.no_grad()
    def _generate_rows(self, ids: list[list[int]], req: Request, seeds: list[int]) -> list[list[int]]:
        """The plain path: ``model.generate`` under greedy decoding with :class:`RowSeededSampler` as its
        logits processor; every row runs until the batch's last one ends."""
        pad = self.tokenizer.pad_token_id
        input_ids, attention = left_padded(ids, pad)
        width = input_ids.shape[1]
        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = dict(max_new_tokens=req.max_tokens, pad_token_id=pad, eos_token_id=self._eos_ids())
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.temperature > 0:
            sampler = RowSeededSampler(seeds, prompt_width=width, temperature=req.temperature, top_p=req.top_p)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        gen = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        return gen[:, width:].cpu().tolist()

    def _eos_ids(self) -> list[int]:
        ids = []
        gc = getattr(self.model, "generation_config", None)
        if gc is not None and gc.eos_token_id is not None:
            ids.extend(gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))
