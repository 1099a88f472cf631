"""Local transformers generation: batched, left-padded, length-sorted, bf16 autocast, stop at EOS.

Sampled rows are seeded one by one (``row_sampling.py``): a sample is the same at any batch size, in
any batch, under any number of processes and after a resume.

The same class serves the student's sampling and the mixed-policy refresh: built from a model name
it loads the model, built with :meth:`HFGenerator.from_model` it samples from weights in memory (the
current student during training, with no reload from disk).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from ..config import HFGeneratorConfig
from ..errors import UserError
from ..models import autocast, load_model, load_tokenizer, render_prompt
from .base import GenerationStats, Request, Sample
from .row_sampling import RowSeededSampler


class HFGenerator:
    """``bf16=False`` turns the bf16 autocast off (plain fp32 on CPU), for the benchmark's fp32 arm."""

    def __init__(
        self, model: Any, tokenizer: Any, name: str, batch_size: int = 16, progress: bool = True, bf16: bool = True
    ):
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
        # dtype float32 asked for by name: plain fp32, no bf16 autocast, so samples are bit-exact at any
        # batch shape (autocast's bf16 rounding can depend on it); auto keeps the fast bf16 path
        return cls(model, tok, name=f"hf:{cfg.model}", batch_size=cfg.sampling.batch_size, progress=progress,
                   bf16=cfg.dtype != "float32")

    @classmethod
    def from_model(
        cls, model: Any, tokenizer: Any, name: str, batch_size: int = 16, progress: bool = True, bf16: bool = True
    ) -> "HFGenerator":
        return cls(model, tokenizer, name=name, batch_size=batch_size, progress=progress, bf16=bf16)

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
            first = requests[batch[0][0]]
            seeds = [requests[i].sample_seed(j) for i, j in batch]
            texts, ntoks, reasons = self._generate_batch([encoded[i] for i, _ in batch], first, seeds)
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

    @torch.no_grad()
    def _generate_batch(
        self, ids: list[list[int]], req: Request, seeds: list[int]
    ) -> tuple[list[str], list[int], list[str]]:
        """Generate one batch; ``req`` gives the batch's shared settings, ``seeds`` each row's seed.

        Sampling goes through :class:`RowSeededSampler` under greedy decoding, so each row's sample is
        a function of its own seed and the weights, never of the batch it happened to share."""
        tok = self.tokenizer
        pad = tok.pad_token_id
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):  # left padding: every prompt ends at the same column
            input_ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            attention[r, width - len(x) :] = 1
        device = next(self.model.parameters()).device
        kwargs: dict[str, Any] = dict(max_new_tokens=req.max_tokens, pad_token_id=pad, eos_token_id=self._eos_ids())
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.temperature > 0:
            sampler = RowSeededSampler(seeds, prompt_width=width, temperature=req.temperature, top_p=req.top_p)
            kwargs["logits_processor"] = LogitsProcessorList([sampler])
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(device, enabled=self.bf16):
                gen = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
                )
        finally:
            self.model.train(was_training)
        new = gen[:, width:].cpu()
        eos = set(self._eos_ids())
        texts, ntoks, reasons = [], [], []
        for row in new.tolist():
            n = len(row)
            reason = "length"
            for t, tid in enumerate(row):
                if tid in eos:
                    n, reason = t, "stop"
                    break
            texts.append(tok.decode(row[:n], skip_special_tokens=True))
            ntoks.append(n + (1 if reason == "stop" else 0))
            reasons.append(reason)
        return texts, ntoks, reasons

    def _eos_ids(self) -> list[int]:
        ids = []
        gc = getattr(self.model, "generation_config", None)
        if gc is not None and gc.eos_token_id is not None:
            ids.extend(gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))
