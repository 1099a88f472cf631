"""The distillation recipe: epochs of training with the mixed-policy refresh between them.

Per epoch ``e``:
  1. (``e > 1``, student negatives) choose ``round(phi_e * Q)`` questions with the run's seed and
     regenerate their negatives with the current student (``student/epoch_e.jsonl``);
  2. build this epoch's pairs (or SFT targets) and write ``pairs/epoch_e.jsonl``;
  3. train one epoch;
  4. write ``checkpoints/epoch_e`` (model, optimizer, scheduler, RNG, negative buffer);
  5. evaluate on the held-out split when ``eval.every_epoch``.
A rerun resumes after the last complete checkpoint and ends with the same weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import distributed
from .batching import group_pairs, tokenize_pair
from .checkpoints import latest_checkpoint, load_training_state, save_checkpoint
from .config import RunConfig
from .errors import UserError
from .generators.hf import HFGenerator
from .models import load_model, load_tokenizer, pick_device, render_prompt, require_4bit_support
from .pairs import (
    Negative,
    NegativeBuffer,
    choose_refresh,
    make_pairs,
    pairs_for_every_positive,
    phi_for_epoch,
    positives,
    sft_targets,
    teacher_negatives,
)
from .store import atomic_write_jsonl
from .training import (
    SftExample,
    apply_lora,
    make_optimizer,
    make_scheduler,
    steps_per_epoch,
    train_epoch,
)

if TYPE_CHECKING:
    from .pipeline import Run


def uses_student_negatives(cfg: RunConfig) -> bool:
    return cfg.train.method == "orpo" and cfg.pairs.negatives in ("student", "both")


def _group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["id"], []).append(r)
    for v in out.values():
        v.sort(key=lambda r: r["sample"])
    return out


@dataclass
class EpochData:
    rows: list[dict[str, Any]]  # what pairs/epoch_E.jsonl holds
    dropped_no_positive: int
    dropped_no_negative: int
    teacher_fallback: int = 0  # questions with no negative of the run's kind, paired with teacher negatives


def chosen_texts(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The positives an epoch's rows train on, per question: the distinct chosen (ORPO) or target (SFT)
    texts. What ``comparison.md`` counts to show that arms saw the same positives."""
    out: dict[str, list[str]] = {}
    for row in rows:
        text = (row.get("chosen") or row.get("completion"))[0]["content"]
        texts = out.setdefault(row["id"], [])
        if text not in texts:
            texts.append(text)
    return out


class Distiller:
    """Holds what the epochs share: the model, the optimizer, the traces and the negative buffer."""

    def __init__(self, run: "Run"):
        self.run = run
        self.cfg = run.cfg
        self.tcfg = run.cfg.train
        self.tokenizer = load_tokenizer(self.cfg.student.model, trust_remote_code=self.cfg.student.trust_remote_code)
        self.records = {r.id: r for r in run.train_records}
        self.teacher = _group(run.teacher_store().all_rows())
        self.qids = [r.id for r in run.train_records if positives(self.teacher.get(r.id, []))]
        self.teacher_negs = {q: teacher_negatives(self.teacher.get(q, [])) for q in self.qids}
        self.buffer = NegativeBuffer()
        self._vllm: Any = None  # the student's vLLM engine, when student.kind is vllm (built on first refresh)

    # ---- data ------------------------------------------------------------------------------------

    def initial_buffer(self) -> NegativeBuffer:
        rows = _group(self.run.student_store(1).all_rows())
        buf = NegativeBuffer.from_traces({q: rows.get(q, []) for q in self.qids}, 1, self.cfg.pairs.filter)
        if self.tcfg.when_all_correct == "teacher":
            for q, negs in buf.negatives.items():
                if not negs:
                    buf.negatives[q] = list(self.teacher_negs[q])
        return buf

    def epoch_data(self, epoch: int) -> EpochData:
        """The pairs (ORPO) or targets (SFT) of one epoch, as rows in TRL's conversational format."""
        seed = self.cfg.pairs.seed + self.cfg.seed
        rows, no_pos, no_neg, fallback = [], 0, 0, 0
        for r in self.run.train_records:
            pos = positives(self.teacher.get(r.id, []))
            if not pos:
                no_pos += 1
                continue
            prompt = self.run.task.messages(r)
            if self.tcfg.method == "sft":
                for text in sft_targets(r.id, pos, self.tcfg.traces, seed):
                    rows.append({"id": r.id, "prompt": prompt, "completion": [{"role": "assistant", "content": text}]})
                continue
            pcfg = self.cfg.pairs
            negs: list[Negative] = []
            if pcfg.negatives in ("teacher", "both"):
                negs += self.teacher_negs[r.id]
            if pcfg.negatives in ("student", "both"):
                negs += self.buffer.negatives.get(r.id, [])
            if not negs and pcfg.no_negative == "teacher" and self.teacher_negs[r.id]:
                negs = list(self.teacher_negs[r.id])
                fallback += 1
            if pcfg.pairing == "every_positive":
                pairs = pairs_for_every_positive(r.id, pos, negs, seed, epoch)
            else:
                pairs = make_pairs(r.id, pos, negs, pcfg.pairs_per_question, seed, epoch)
            if not pairs:
                no_neg += 1
            for chosen, neg in pairs:
                rows.append({
                    "id": r.id,
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": neg.text}],
                    "rejected_source": neg.source,
                    "rejected_epoch": neg.epoch,
                })
        return EpochData(rows, no_pos, no_neg, fallback)

    def tokenize(self, rows: list[dict[str, Any]]) -> list[Any]:
        """Token ids of an epoch's rows: SFT examples, or one pair group per question for ORPO."""
        tok, max_len = self.tokenizer, self.tcfg.max_length
        sft: list[Any] = []
        pairs = []
        for row in rows:
            prompt_text = render_prompt(tok, row["prompt"])
            if "completion" in row:
                p = tokenize_pair(tok, prompt_text, row["completion"][0]["content"], "", max_len)
                sft.append(SftExample(p.prompt_ids, p.chosen_ids))
            else:
                pairs.append(tokenize_pair(tok, prompt_text, row["chosen"][0]["content"], row["rejected"][0]["content"], max_len))
        return sft if sft else group_pairs(pairs)

    def upper_bound_examples(self) -> int:
        """An upper bound on examples per epoch, for a schedule that never runs past its end."""
        if self.tcfg.method == "sft":
            if self.tcfg.traces == "single":
                return len(self.qids)
            return sum(len(positives(self.teacher[q])) for q in self.qids)
        if self.cfg.pairs.pairing == "every_positive":
            return sum(len(positives(self.teacher[q])) for q in self.qids)
        return len(self.qids) * self.cfg.pairs.pairs_per_question

    def group_size(self) -> int:
        """The most pairs one question can bring to a micro-batch (its pairs stay together)."""
        if self.tcfg.method != "orpo":
            return 1
        if self.cfg.pairs.pairing == "every_positive":
            return max((len(positives(self.teacher[q])) for q in self.qids), default=1)
        return self.cfg.pairs.pairs_per_question

    def write_pairs(self, epoch: int, data: EpochData) -> Path:
        """``pairs/epoch_E.jsonl``, and a ``pairs`` event with what the epoch trains on: rows, the
        questions and distinct positives its chosen side covers and their student tokens (eos
        included), and the questions left out."""
        path = self.run.dir / "pairs" / f"epoch_{epoch}.jsonl"
        atomic_write_jsonl(path, data.rows)
        chosen = chosen_texts(data.rows)
        eos = 1 if self.tokenizer.eos_token_id is not None else 0
        tokens = sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) + eos
                     for texts in chosen.values() for t in texts)
        self.run.metrics.log("pairs", epoch=epoch, rows=len(data.rows), questions=len(chosen),
                             positives=sum(len(t) for t in chosen.values()), positive_tokens=tokens,
                             dropped_no_positive=data.dropped_no_positive,
                             dropped_no_negative=data.dropped_no_negative, teacher_fallback=data.teacher_fallback)
        return path

    # ---- the refresh ---------------------------------------------------------------------------

    def refresh(self, epoch: int, model: Any) -> None:
        t = self.tcfg
        phi = phi_for_epoch(epoch, t.epochs, t.policy, t.phi, t.phi_schedule, t.phi_start)
        chosen = choose_refresh(sorted(self.buffer.negatives), phi, self.cfg.seed, epoch)
        if chosen:
            # each rank samples its share of the chosen questions; every rank gets all the samples back,
            # so the buffer below is the same on every rank
            gen = distributed.sharded(self.refresh_generator(epoch, model))
            self.run.student(epoch=epoch, generator=gen, records=[self.records[q] for q in chosen])
            store = self.run.student_store(epoch, gen.name)
            new = {q: store.for_question(q) for q in chosen}
        else:
            new = {}
        result = self.buffer.refresh(new, epoch, self.cfg.pairs.filter, t.when_all_correct, self.teacher_negs)
        self.run.metrics.log("refresh", epoch=epoch, phi=phi, questions=len(self.buffer.negatives),
                             selected=len(chosen), refreshed=result.refreshed, all_correct=result.all_correct,
                             fell_back_to_teacher=result.fell_back_to_teacher)

    def refresh_generator(self, epoch: int, model: Any) -> Any:
        """A generator that samples from the current weights: the model in memory (``hf``), or a vLLM
        engine built once and given the current weights in place before each refresh (``vllm``)."""
        scfg = self.cfg.student
        if scfg.kind != "vllm":
            return HFGenerator.from_model(model, self.tokenizer, name=f"hf:student@epoch_{epoch - 1}",
                                          batch_size=scfg.sampling.batch_size, progress=self.run.progress)
        from .generators.vllm import VLLMGenerator

        if self._vllm is None:
            self._vllm = VLLMGenerator.from_config(scfg, progress=self.run.progress)
        self._vllm.load_weights(model)
        self._vllm.name = f"vllm:student@epoch_{epoch - 1}"
        return self._vllm

    # ---- the whole training stage -----------------------------------------------------------------

    def load_student(self, checkpoint: Path | None) -> Any:
        scfg = self.cfg.student
        if self.tcfg.lora.enabled:
            if self.tcfg.lora.load_in_4bit:  # QLoRA: a frozen 4-bit base, prepared for k-bit training
                from peft import prepare_model_for_kbit_training

                require_4bit_support(scfg.device)
                model = load_model(scfg.model, trust_remote_code=scfg.trust_remote_code, device=scfg.device,
                                   quantization="4bit")
                model = prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=self.tcfg.gradient_checkpointing)
            else:
                model = load_model(scfg.model, dtype="float32", trust_remote_code=scfg.trust_remote_code,
                                   device=scfg.device)
            if checkpoint is None:
                return self._checkpointing(apply_lora(model, self.tcfg.lora))
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
            return self._checkpointing(model)
        name = str(checkpoint) if checkpoint is not None else scfg.model
        model = load_model(name, dtype="float32", trust_remote_code=scfg.trust_remote_code, device=scfg.device)
        return self._checkpointing(model)

    def _checkpointing(self, model: Any) -> Any:
        """Gradient checkpointing where the config asks for it (LoRA included: large students need it)."""
        if self.tcfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()  # so checkpointed blocks see a grad path with frozen embeddings
            model.config.use_cache = False
        return model

    def train(self) -> dict[str, Any]:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        t, run = self.tcfg, self.run
        if uses_student_negatives(self.cfg):  # a bad phi schedule fails now, not before epoch 3
            for e in range(2, t.epochs + 1):
                phi_for_epoch(e, t.epochs, t.policy, t.phi, t.phi_schedule, t.phi_start)
        acc = Accelerator(cpu=pick_device(self.cfg.student.device).type == "cpu")
        self._check_sharding(acc)
        # FSDP and DeepSpeed split weights or optimizer state over the ranks: the full weights are gathered
        # (a collective, so every rank calls get_state_dict) and the optimizer state is not saved
        sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        ckpt = latest_checkpoint(run.dir)
        state: dict[str, Any] = {"global_step": 0}
        if ckpt is not None:
            state = json.loads((ckpt / "state.json").read_text())
            if state["epoch"] >= t.epochs:
                if acc.is_main_process and not (run.dir / "model" / "config.json").is_file():
                    self.export(self.load_student(ckpt))  # killed after the last checkpoint, before the export
                return {"epochs": t.epochs, "resumed_from": state["epoch"], "trained": False}
        torch.manual_seed(t.seed + self.cfg.seed)
        model = self.load_student(ckpt)
        optimizer = make_optimizer(model, t)
        total = t.epochs * steps_per_epoch(self.upper_bound_examples(), t, acc.num_processes,
                                           group_size=self.group_size())
        scheduler = make_scheduler(optimizer, t, total)
        model, optimizer = acc.prepare(model, optimizer)
        start = 1
        if ckpt is not None:
            state, buffer = load_training_state(ckpt, optimizer, scheduler)
            self.buffer = NegativeBuffer.from_dict(buffer)
            start = state["epoch"] + 1
            run.metrics.log("resume", checkpoint=str(ckpt), epoch=state["epoch"])
        elif uses_student_negatives(self.cfg):
            self.buffer = self.initial_buffer()
        global_step = state.get("global_step", 0)
        for epoch in range(start, t.epochs + 1):
            if epoch > 1 and uses_student_negatives(self.cfg):
                self.refresh(epoch, acc.unwrap_model(model))
            data = self.epoch_data(epoch)
            if acc.is_main_process:
                self.write_pairs(epoch, data)
            if not data.rows:
                raise UserError(f"epoch {epoch} has nothing to train on: {data.dropped_no_positive} questions have no "
                                f"correct teacher trace and {data.dropped_no_negative} no negative")
            examples = self.tokenize(data.rows)
            result = train_epoch(model, examples, optimizer, scheduler, t, epoch, self.tokenizer.pad_token_id, acc,
                                 log=lambda row: run.metrics.log("train", **row), global_step=global_step,
                                 progress=run.progress, run_seed=self.cfg.seed)
            global_step += result.steps
            run.metrics.log("epoch", epoch=epoch, steps=result.steps, examples=result.examples, tokens=result.tokens,
                            seconds=result.seconds)
            full_state = acc.get_state_dict(model) if sharded else None
            if acc.is_main_process:
                save_checkpoint(run.dir, epoch, acc.unwrap_model(model), self.tokenizer,
                                None if sharded else optimizer, scheduler,
                                self.buffer.to_dict(), {"global_step": global_step, "world_size": acc.num_processes},
                                state_dict=full_state)
            acc.wait_for_everyone()
            if self.cfg.eval.every_epoch:
                run.evaluate(epoch, model=acc.unwrap_model(model), tokenizer=self.tokenizer)
        full_state = acc.get_state_dict(model) if sharded else None
        if acc.is_main_process:
            self.export(acc.unwrap_model(model), full_state)
        acc.wait_for_everyone()
        return {"epochs": t.epochs, "resumed_from": start - 1, "trained": True, "global_step": global_step}

    def _check_sharding(self, acc: Any) -> None:
        """Sampling during training (the refresh, per-epoch evaluation) runs each rank's own module,
        which under FSDP or ZeRO-3 holds only a shard of the weights: refuse before training starts."""
        from accelerate.utils import DistributedType

        plugin = getattr(acc.state, "deepspeed_plugin", None)
        sharded = acc.distributed_type == DistributedType.FSDP or (
            acc.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3)
        refresh = uses_student_negatives(self.cfg) and self.tcfg.epochs > 1 and self.tcfg.policy != "off"
        if sharded and (refresh or self.cfg.eval.every_epoch):
            raise UserError(
                "FSDP and DeepSpeed ZeRO-3 shard the weights over the ranks, but the mixed-policy refresh and "
                "per-epoch evaluation sample from the whole model during training, which is not supported yet. "
                "Use DDP or ZeRO-2 (configs/accelerate/ddp.yaml, deepspeed-zero2.yaml), or set "
                "eval.every_epoch=false with train.policy=off or pairs.negatives=teacher.")

    def export(self, model: Any, state_dict: dict[str, Any] | None = None) -> Path:
        """``model/``: the distilled student as a plain checkpoint (LoRA merged) for ``from_pretrained``;
        a LoRA run also keeps its adapter alone in ``model/adapter/`` (PEFT's ``save_pretrained``)."""
        target = self.run.dir / "model"
        tmp = target.with_name(".model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if self.tcfg.lora.enabled:
            model.save_pretrained(tmp / "adapter")  # before the merge, which removes the adapter's layers
            if self.tcfg.lora.load_in_4bit:
                model = self._merged_from_4bit(tmp / "adapter")
            else:
                model = model.merge_and_unload()
            state_dict = None  # the gathered state is the adapter's; the merged model has its own
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        self.tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target

    def _merged_from_4bit(self, adapter: Path) -> Any:
        """A 4-bit base cannot take the adapter into full-precision weights: reload the base on the CPU in
        the student's dtype (bf16 for ``auto``, QLoRA's compute dtype), load the adapter and merge."""
        from peft import PeftModel

        scfg = self.cfg.student
        base = load_model(scfg.model, dtype="bfloat16" if scfg.dtype == "auto" else scfg.dtype,
                          trust_remote_code=scfg.trust_remote_code, device="cpu")
        return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
