"""The training stage: epochs of training with the mixed-policy refresh between them.

Per epoch ``e`` (with ``train.sft_epochs: S``, epochs 1..S are SFT on every correct trace, and epoch S+1's
negatives are every question's, sampled from the SFT'd student; the refreshes below count from there):
  1. (``e > 1``, student negatives) choose ``round(phi_e * Q)`` questions with the run's seed and
     regenerate their negatives with the current student (``student/epoch_e.jsonl``);
  2. build this epoch's pairs (or SFT targets; ``epoch_rows.py``) and write ``pairs/epoch_e.jsonl``;
  3. train one epoch (``training.py``);
  4. write ``checkpoints/epoch_e`` (model, optimizer, scheduler, RNG, negative buffer, training settings);
  5. evaluate on the held-out split when ``eval.every_epoch``.
A rerun resumes after the last complete checkpoint and ends with the same weights.

The stage receives what it uses (:class:`TrainingInputs`: the records, the prompt builder, the teacher
traces, a sampler for the refresh and an evaluator) and never the runner; ``pipeline.Run`` composes it.
See docs/architecture.md.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import distributed
from .allocator import release_free_memory
from .batching import group_pairs, tokenize_pair
from .checkpoints import (full_optimizer_state, latest_checkpoint, load_training_state, save_checkpoint,
                          save_deepspeed_state)
from .config import PhiRamp, RunConfig
from .epoch_rows import (EpochData, FirstError, Messages, chosen_texts, epoch_rows, examples_upper_bound, group_traces,
                         largest_group)
from .errors import UserError
from .generators.base import Generator
from .generators.hf import HFGenerator
from .layout import STATE, RunLayout, student_generator_name
from .metrics import MetricsLog
from .models import cpu_name, load_tokenizer, pick_device, render_prompt
from .pairs import (NegativeBuffer, choose_refresh, phi_for_epoch, positives, teacher_negatives,
                    without_near_duplicates)
from .provenance import code_version, conflict, training_settings, uses_student_negatives
from .records import Record
from .chosen_logp import response_logps
from .store import atomic_write_jsonl, read_jsonl, settings_hash
from .text_similarity import pair_similarity
from .student_weights import export_student, load_trainable_student
from .trackers import Forwarder, check_installed, tracker_config
from .training import SftExample, make_optimizer, make_scheduler, steps_per_epoch, train_epoch, use_bf16
from .whole_weights import is_fsdp2, weights_to_save, whole_model

__all__ = ["Distiller", "TrainingInputs", "EpochData", "chosen_texts", "tokenize_rows", "uses_student_negatives"]

# (epoch, generator, records) -> the samples drawn, by question id: the refresh's student samples
Sampler = Callable[[int, Generator, Sequence[Record]], dict[str, list[dict[str, Any]]]]
# (epoch, model, tokenizer) -> the evaluation's summary
Evaluator = Callable[[int, Any, Any], Any]


@dataclass
class TrainingInputs:
    """What the training stage reads: everything else it is given is config, paths and the log."""

    records: list[Record]  # the training questions
    messages: Messages  # the task's prompt of a record, as chat messages
    teacher_rows: list[dict[str, Any]]  # the verified teacher traces
    # (epoch, generator name) -> the student samples stored before that epoch (name None: the initial student's)
    student_rows: Callable[[int, str | None], list[dict[str, Any]]]
    sample: Sampler  # draws the refresh's samples and stores them in student/epoch_E.jsonl
    evaluate: Evaluator | None = None  # the per-epoch evaluation (eval.every_epoch)
    first_error: FirstError | None = None  # the task's first-error locator (pairs.rejected_span: first_error)


def tokenize_rows(tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int,
                  pairs_per_row: int | None = None) -> list[Any]:
    """Token ids of an epoch's rows: SFT examples, or for ORPO pair groups, one per question (at most
    ``pairs_per_row`` pairs each; more groups for a question with more pairs)."""
    sft: list[Any] = []
    pairs = []
    for row in rows:
        prompt_text = render_prompt(tokenizer, row["prompt"])
        if "completion" in row:
            p = tokenize_pair(tokenizer, prompt_text, row["completion"][0]["content"], "", max_length)
            sft.append(SftExample(p.prompt_ids, p.chosen_ids))
        else:
            rejected = row["rejected"][0]["content"] if row.get("rejected") else None  # None: NLL-only
            pairs.append(tokenize_pair(tokenizer, prompt_text, row["chosen"][0]["content"], rejected, max_length,
                                       rejected_from=row.get("rejected_from"), chosen_ref=row.get("chosen_ref_logp")))
    return sft if sft else group_pairs(pairs, max_pairs=pairs_per_row)


class Distiller:
    """Holds what the epochs share: the model, the optimizer, the traces and the negative buffer."""

    def __init__(self, cfg: RunConfig, layout: RunLayout, metrics: MetricsLog, inputs: TrainingInputs,
                 progress: bool = True, tokenizer: Any = None):
        self.cfg = cfg
        self.tcfg = cfg.train
        self.layout = layout
        self.metrics = metrics
        self.inputs = inputs
        self.progress = progress
        self.tokenizer = tokenizer or load_tokenizer(cfg.local_student.model, trust_remote_code=cfg.local_student.trust_remote_code)
        self.records = {r.id: r for r in inputs.records}
        self.teacher, self.teacher_dropped = self.deduplicated(group_traces(inputs.teacher_rows))
        self.qids = [r.id for r in inputs.records if positives(self.teacher.get(r.id, []))]
        self.teacher_negs = {q: teacher_negatives(self.teacher.get(q, [])) for q in self.qids}
        self.buffer = NegativeBuffer()
        self.reference: dict[tuple[str, str], float] | None = None  # l_ref of each positive (train.protect_chosen)
        self._vllm: Any = None  # the student's vLLM engine, when student.kind is vllm (built on first refresh)

    # ---- data ------------------------------------------------------------------------------------

    def deduplicated(self, by_qid: dict[str, list[Any]]) -> tuple[dict[str, list[Any]], int]:
        """Each question's traces without near-duplicates (``pairs.dedup_rouge_l``), and how many went."""
        out, dropped = {}, 0
        for q, traces in by_qid.items():
            out[q], n = without_near_duplicates(traces, self.cfg.pairs.dedup_rouge_l)
            dropped += n
        return out, dropped

    @property
    def first_term_epoch(self) -> int:
        """The first epoch trained with the odds-ratio term (``train.sft_epochs`` + 1)."""
        return self.tcfg.sft_epochs + 1

    def sampler_name(self, epoch: int) -> str:
        """The name of the generator that samples the student before ``epoch`` (its store's settings)."""
        name = student_generator_name(epoch - 1)
        return name.replace("hf:", "vllm:", 1) if self.cfg.student.kind == "vllm" else name

    @cached_property
    def initial_negatives(self) -> NegativeBuffer:
        """The negatives of the term's first epoch, read once: the initial student's, or with
        ``train.sft_epochs`` the SFT'd student's (drawn by :meth:`sample_stage_start`). That epoch's buffer
        starts as a copy (:meth:`initial_buffer`), and ``train.unrefreshed: initial`` returns to them
        (:meth:`anchor`)."""
        first = self.first_term_epoch
        rows, dropped = self.deduplicated(group_traces(
            self.inputs.student_rows(first, None if first == 1 else self.sampler_name(first))))
        if self.cfg.pairs.dedup_rouge_l is not None:
            self.metrics.log("dedup", source=f"student@{first}", threshold=self.cfg.pairs.dedup_rouge_l,
                             dropped=dropped, kept=sum(len(v) for v in rows.values()))
        buf = NegativeBuffer.from_traces({q: rows.get(q, []) for q in self.qids}, first, self.cfg.pairs.filter)
        if self.tcfg.when_all_correct == "teacher":
            for q, negs in buf.negatives.items():
                if not negs:
                    buf.negatives[q] = list(self.teacher_negs[q])
        return buf

    def initial_buffer(self) -> NegativeBuffer:
        """A copy of :attr:`initial_negatives`: the buffer of the term's first epoch, which the refreshes change."""
        return NegativeBuffer.from_dict(self.initial_negatives.to_dict())

    def anchor(self) -> dict[str, Any] | None:
        """What a question not resampled at a refresh returns to: the initial student's negatives under
        ``train.unrefreshed: initial`` (the paper's policy), None (keep the previous ones) otherwise."""
        return self.initial_negatives.negatives if self.tcfg.unrefreshed == "initial" else None

    def epoch_data(self, epoch: int) -> EpochData:
        """The pairs (ORPO) or targets (SFT, and an ORPO run's SFT epochs) of one epoch (``epoch_rows.epoch_rows``)."""
        return epoch_rows(self.inputs.records, self.inputs.messages, self.teacher, self.buffer.negatives,
                          self.epoch_config(epoch), self.cfg.pairs, self.cfg.seed, epoch,
                          first_error=self.inputs.first_error,
                          chosen_ref=self.reference if epoch >= self.first_term_epoch else None)

    def steps_bound(self, epoch: int, processes: int) -> int:
        """At most how many optimizer steps ``epoch`` takes: the learning-rate schedule never runs past its end."""
        t = self.epoch_config(epoch)
        bound = examples_upper_bound(self.teacher, self.qids, t, self.cfg.pairs)
        group = largest_group(self.teacher, self.qids, t, self.cfg.pairs)
        return steps_per_epoch(bound, t, processes, group_size=group)

    def chosen_reference(self, model: Any, epoch: int) -> dict[tuple[str, str], float]:
        """Each (question id, positive)'s mean log-probability under ``model``, the weights the term starts
        from (``train.protect_chosen``): computed once at the term's first epoch and kept in
        ``pairs/chosen_reference.jsonl``, which a resumed run reads back."""
        path = self.layout.chosen_reference
        if path.is_file():
            return {(r["id"], r["text"]): r["logp"] for r in read_jsonl(path)}
        if epoch > self.first_term_epoch:  # the weights the term started from are gone: refuse, never guess
            raise UserError(f"{path} is missing, but training resumes at epoch {epoch}, after the odds-ratio term "
                            f"started (epoch {self.first_term_epoch}): the references train.protect_chosen needs were "
                            "made from the weights then. Train this run again from the start (delete its "
                            "checkpoints/), or restore the file")
        keys = [(q, text) for q in self.qids for text in positives(self.teacher[q])]
        items = [(self.inputs.messages(self.records[q]), text) for q, text in keys]
        device = next(model.parameters()).device
        values = response_logps(model, self.tokenizer, items, self.tcfg.max_length,
                                batch_size=self.tcfg.batch_size, bf16=use_bf16(self.tcfg.precision, device))
        if distributed.is_main():
            atomic_write_jsonl(path, [{"id": q, "text": text, "logp": v} for (q, text), v in zip(keys, values)])
        self.metrics.log("chosen_reference", positives=len(keys), mean_logp=sum(values) / max(len(values), 1))
        return dict(zip(keys, values))

    def epoch_config(self, epoch: int) -> Any:
        """The training settings of ``epoch``: the run's, or in an SFT stage (``train.sft_epochs``) SFT on
        every correct teacher trace, as sft-diverse trains (the learning-rate schedule spans both stages)."""
        if epoch < self.first_term_epoch:
            return self.tcfg.model_copy(update={"method": "sft", "traces": "all"})
        return self.tcfg

    def tokenize(self, rows: list[dict[str, Any]]) -> list[Any]:
        return tokenize_rows(self.tokenizer, rows, self.tcfg.max_length, self.tcfg.pairs_per_row)

    def write_pairs(self, epoch: int, data: EpochData) -> Path:
        """``pairs/epoch_E.jsonl``, and a ``pairs`` event with what the epoch trains on: rows, the
        questions and distinct positives its chosen side covers and their student tokens (eos
        included), the questions left out, and how close the negatives are to their positives
        (``text_similarity.pair_similarity``; empty for SFT)."""
        path = self.layout.pairs(epoch)
        atomic_write_jsonl(path, data.rows)
        chosen = chosen_texts(data.rows)
        eos = 1 if self.tokenizer.eos_token_id is not None else 0
        tokens = sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) + eos
                     for texts in chosen.values() for t in texts)
        self.metrics.log("pairs", epoch=epoch, rows=len(data.rows), questions=len(chosen),
                         positives=sum(len(t) for t in chosen.values()), positive_tokens=tokens,
                         dropped_no_positive=data.dropped_no_positive,
                         dropped_no_negative=data.dropped_no_negative, teacher_fallback=data.teacher_fallback,
                         nll_only=data.nll_only, too_similar=data.too_similar, localised=data.localised,
                         similarity=pair_similarity(data.rows))
        return path

    # ---- the refresh ---------------------------------------------------------------------------

    def phi(self, epoch: int) -> float:
        """The share of questions whose negatives are regenerated before ``epoch``; the refreshes count from
        the term's first epoch (an SFT stage's epochs have none)."""
        phi, s = self.tcfg.phi, self.tcfg.sft_epochs
        if isinstance(phi, PhiRamp):
            return phi_for_epoch(epoch - s, self.tcfg.epochs - s, phi.linear, linear=True)
        return phi_for_epoch(epoch - s, self.tcfg.epochs - s, phi)

    def sample_stage_start(self, epoch: int, model: Any) -> None:
        """Before the term's first epoch after an SFT stage: every question's negatives from the SFT'd
        student (``student/epoch_E.jsonl``, resumed where a killed run left it), which become the buffer."""
        release_free_memory()
        with whole_model(model) as whole:
            gen = distributed.split_across_ranks(self.refresh_generator(epoch, whole))
            self.inputs.sample(epoch, gen, [self.records[q] for q in self.qids])
        self.buffer = self.initial_buffer()
        self.metrics.log("stage_negatives", epoch=epoch, questions=len(self.qids),
                         with_negatives=sum(1 for v in self.buffer.negatives.values() if v))

    def refresh(self, epoch: int, model: Any) -> None:
        phi = self.phi(epoch)
        chosen = choose_refresh(sorted(self.buffer.negatives), phi, self.cfg.seed, epoch)
        if chosen:
            release_free_memory()  # the epoch's activations: freed, but resident until handed back
            # each rank samples its share of the chosen questions; every rank gets all the samples back,
            # so the buffer below is the same on every rank. Under FSDP2 from a gathered whole copy.
            with whole_model(model) as whole:
                gen = distributed.split_across_ranks(self.refresh_generator(epoch, whole))
                new = self.inputs.sample(epoch, gen, [self.records[q] for q in chosen])
        else:
            new = {}
        new, dropped = self.deduplicated(new)
        result = self.buffer.refresh(new, epoch, self.cfg.pairs.filter, self.tcfg.when_all_correct, self.teacher_negs,
                                     anchor=self.anchor())
        self.metrics.log("refresh", epoch=epoch, phi=phi, questions=len(self.buffer.negatives),
                         selected=len(chosen), refreshed=result.refreshed, all_correct=result.all_correct,
                         fell_back_to_teacher=result.fell_back_to_teacher, unrefreshed=self.tcfg.unrefreshed,
                         near_duplicates_dropped=dropped)

    def refresh_generator(self, epoch: int, model: Any) -> Any:
        """A generator that samples from the current weights: the model in memory (``hf``), or a vLLM
        engine built once and given the current weights in place before each refresh (``vllm``)."""
        scfg = self.cfg.student
        name = self.sampler_name(epoch)
        if scfg.kind != "vllm":
            return HFGenerator.for_student(model, self.tokenizer, self.cfg.local_student.dtype, name,
                                           scfg.sampling.batch_size, progress=self.progress)
        from .generators.vllm import VLLMGenerator

        if self._vllm is None:
            self._vllm = VLLMGenerator.from_config(scfg, progress=self.progress)
        self._vllm.load_weights(model)
        self._vllm.name = name
        return self._vllm

    # ---- the whole training stage -----------------------------------------------------------------

    def load_student(self, checkpoint: Path | None) -> Any:
        return load_trainable_student(self.cfg, checkpoint)

    def export(self, model: Any, state_dict: dict[str, Any] | None = None) -> Path:
        return export_student(model, self.tokenizer, self.cfg, self.layout, state_dict)

    def train(self, reuse: bool = False) -> dict[str, Any]:
        """Train every epoch after the newest complete checkpoint. ``reuse``: resume from a checkpoint
        even when it records other training settings (the caller was told; see ``provenance``)."""
        from accelerate import Accelerator

        t = self.tcfg
        if uses_student_negatives(self.cfg):  # a bad phi schedule fails now, not before epoch 3
            for e in range(2, t.epochs + 1):
                self.phi(e)
        check_installed(t.report_to)  # a missing tracker package fails now, not after the first epoch
        acc = Accelerator(cpu=pick_device(self.cfg.local_student.device).type == "cpu", log_with=t.report_to or None,
                          project_dir=str(self.layout.trackers) if t.report_to else None)
        self._check_sharding(acc)
        ckpt = latest_checkpoint(self.layout.root)
        state = json.loads((ckpt / STATE).read_text()) if ckpt is not None else None
        with self.tracking(acc, finished=state is not None and state["epoch"] >= t.epochs):
            return self._epochs(acc, reuse, ckpt, state)

    @contextmanager
    def tracking(self, acc: Any, finished: bool) -> Iterator[None]:
        """The experiment trackers of ``train.report_to`` (``trackers.py``) for the length of the training:
        the training settings as their configuration, the metrics log's events forwarded to them."""
        if not self.tcfg.report_to or finished:  # a finished run trains nothing: no empty tracker run
            yield
            return
        root = self.layout.root.resolve()  # a compare arm's folder is seed_N: its arm's name too
        acc.init_trackers("-".join(p for p in (root.parent.name, root.name) if p) or "orpo-distill",
                          config=tracker_config(training_settings(self.cfg)))
        forward = Forwarder(lambda values, step: acc.log(values, step=step))
        self.metrics.listeners.append(forward)
        try:
            yield
        finally:
            self.metrics.listeners.remove(forward)
            acc.end_training()

    def _epochs(self, acc: Any, reuse: bool, ckpt: Path | None, state: dict[str, Any] | None) -> dict[str, Any]:
        """The epochs after ``ckpt``, the newest complete checkpoint (``state``: its state.json), on ``acc``'s
        processes (see :meth:`train`)."""
        from accelerate.utils import DistributedType

        t = self.tcfg
        # FSDP and DeepSpeed split weights or optimizer state over the ranks: the full weights are gathered
        # (a collective, so every rank calls get_state_dict); the optimizer state is gathered whole (FSDP2) or
        # saved by every rank, its own partition (DeepSpeed, in DeepSpeed's layout)
        gather_weights = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if deepspeed:
            distributed.align_deepspeed_clipping(acc.state.deepspeed_plugin.deepspeed_config, t.max_grad_norm)
        settings = training_settings(self.cfg)
        if ckpt is not None and state is not None:
            refused = None if reuse else conflict(ckpt, state, self.cfg)  # Run() sets such weights aside first
            if refused:
                raise UserError(refused)
            if state["epoch"] >= t.epochs:
                if acc.is_main_process and not self.layout.has_model():
                    self.export(self.load_student(ckpt))  # killed after the last checkpoint, before the export
                return {"epochs": t.epochs, "resumed_from": state["epoch"], "trained": False}
        torch.manual_seed(t.seed + self.cfg.seed)
        model = self.load_student(ckpt)
        optimizer = make_optimizer(model, t, sharded=gather_weights)
        total = sum(self.steps_bound(e, acc.num_processes) for e in range(1, t.epochs + 1))
        scheduler = make_scheduler(optimizer, t, total)
        model, optimizer = acc.prepare(model, optimizer)
        start = 1
        if ckpt is not None:
            state, buffer = load_training_state(ckpt, optimizer, scheduler, model=model if is_fsdp2(model) else None,
                                                deepspeed_engine=model if deepspeed else None,
                                                world_size=acc.num_processes)
            self.buffer = NegativeBuffer.from_dict(buffer)
            start = state["epoch"] + 1
            self.metrics.log("resume", checkpoint=str(ckpt), epoch=state["epoch"])
        elif uses_student_negatives(self.cfg) and self.first_term_epoch == 1:
            self.buffer = self.initial_buffer()
        if self.cfg.pairs.dedup_rouge_l is not None:
            self.metrics.log("dedup", source="teacher", threshold=self.cfg.pairs.dedup_rouge_l,
                             dropped=self.teacher_dropped, kept=sum(len(v) for v in self.teacher.values()))
        global_step = state.get("global_step", 0) if state is not None else 0
        record = {"settings_hash": settings_hash(settings), "settings": settings}
        for epoch in range(start, t.epochs + 1):
            if uses_student_negatives(self.cfg) and epoch > 1:
                if epoch == self.first_term_epoch:  # after an SFT stage
                    self.sample_stage_start(epoch, acc.unwrap_model(model))
                elif epoch > self.first_term_epoch:
                    self.refresh(epoch, acc.unwrap_model(model))
            if t.protect_chosen > 0 and epoch >= self.first_term_epoch and self.reference is None:
                self.reference = self.chosen_reference(acc.unwrap_model(model), epoch)
            data = self.epoch_data(epoch)
            if acc.is_main_process:
                self.write_pairs(epoch, data)
            if not data.rows:
                raise UserError(f"epoch {epoch} has nothing to train on: {data.dropped_no_positive} questions have no "
                                f"correct teacher trace and {data.dropped_no_negative} no negative")
            result = train_epoch(model, self.tokenize(data.rows), optimizer, scheduler, self.epoch_config(epoch), epoch,
                                 self.tokenizer.pad_token_id, acc, log=lambda row: self.metrics.log("train", **row),
                                 global_step=global_step, progress=self.progress, run_seed=self.cfg.seed)
            global_step += result.steps
            self.metrics.log("epoch", epoch=epoch, steps=result.steps, examples=result.examples, tokens=result.tokens,
                             seconds=result.seconds, processes=acc.num_processes,
                             distributed=str(getattr(acc.distributed_type, "value", acc.distributed_type)),
                             precision=result.precision,
                             device=acc.device.type, cpu=cpu_name(), code=code_version())
            optimizer_state = full_optimizer_state(model, optimizer) if is_fsdp2(model) else None  # collective
            staged = save_deepspeed_state(model, self.layout.root, epoch) if deepspeed else None  # collective
            with weights_to_save(acc, model, gather_weights) as (module, full_state):  # collective
                if acc.is_main_process:
                    save_checkpoint(self.layout.root, epoch, module, self.tokenizer,
                                    None if gather_weights else optimizer, scheduler, self.buffer.to_dict(),
                                    {"global_step": global_step, "world_size": acc.num_processes, **record},
                                    state_dict=full_state, optimizer_state=optimizer_state, deepspeed_state=staged)
            acc.wait_for_everyone()
            if self.cfg.eval.every_epoch and self.inputs.evaluate is not None:
                with whole_model(acc.unwrap_model(model)) as whole:
                    self.inputs.evaluate(epoch, whole, self.tokenizer)
        with weights_to_save(acc, model, gather_weights) as (module, full_state):  # collective
            if acc.is_main_process:
                self.export(module, full_state)
        acc.wait_for_everyone()
        return {"epochs": t.epochs, "resumed_from": start - 1, "trained": True, "global_step": global_step}

    def _check_sharding(self, acc: Any) -> None:
        """Sampling during training (the refresh, per-epoch evaluation) needs the whole weights on every
        rank: FSDP2 and ZeRO-3 gather them (``whole_weights``); FSDP1, which this trainer cannot gather for
        generation, is refused before training starts."""
        from accelerate.utils import DistributedType

        fsdp1 = acc.distributed_type == DistributedType.FSDP and not getattr(acc, "is_fsdp2", False)
        if fsdp1 and (self.cfg.samples_student_in_training or self.cfg.eval.every_epoch):
            raise UserError(
                "FSDP1 shards the weights over the ranks as flat parameters, and the mixed-policy refresh and "
                "per-epoch evaluation sample from the whole model during training, which this trainer gathers only "
                "under FSDP2 and DeepSpeed ZeRO-3. Use FSDP2 (fsdp_version: 2, configs/accelerate/fsdp.yaml), "
                "ZeRO-3 (deepspeed-zero3.yaml), DDP or ZeRO-2 (ddp.yaml, deepspeed-zero2.yaml), or set "
                "eval.every_epoch=false with train.phi=0 and train.sft_epochs=0, or pairs.negatives=teacher.")
