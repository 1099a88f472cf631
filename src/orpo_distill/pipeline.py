"""A run: one directory, one config, and the stages that read and write files in it.

Each stage is a method that is safe to call again: it skips what is already on disk and does only
what is missing. ``run_all`` calls them in order. The heavy lifting lives in the stage modules
(sampling, pairs, training, evaluation); this file only wires them to the run directory.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

from . import distributed
from .checkpoints import checkpoint_dir
from .config import RunConfig, save_resolved
from .errors import UserError
from .evaluation import EvalSummary, evaluate
from .datasets import load_splits
from .generators import build_generator
from .generators.base import Generator
from .generators.hf import HFGenerator
from .metrics import MetricsLog
from .models import load_model, load_tokenizer, pick_device
from .records import Record
from .sampling import SampleSummary, sample_traces, sampling_settings
from .store import TraceStore, atomic_write_json, atomic_write_jsonl, settings_hash
from .tasks import build_task


class Run:
    def __init__(self, cfg: RunConfig, overwrite: bool = False, progress: bool = True):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.overwrite = overwrite
        # Under `accelerate launch` every process runs this; only the main one writes (distributed.py)
        if distributed.world_size() > 1:  # (one process: no device question asked here)
            distributed.init(cpu=pick_device(cfg.student.device).type == "cpu")
        self.writer = distributed.is_main()
        self.progress = progress and self.writer
        if self.writer:
            _make_run_dir(self.dir)
            save_resolved(cfg, self.dir / "config.yaml")
        distributed.barrier()
        self.metrics = MetricsLog(self.dir / "metrics.jsonl", enabled=self.writer)

    # ---- inputs -------------------------------------------------------------------------------

    @cached_property
    def splits(self) -> tuple[list[Record], list[Record]]:
        train, held_out = load_splits(self.cfg.dataset, task_kind=self.cfg.task.kind)
        if not train:
            raise UserError("the dataset has no training questions (check dataset.path, fields and train_size)")
        for r in [*train, *held_out]:  # bad gold fails here, before anything is generated
            self.task.normalize_gold(r)
        return train, held_out

    @property
    def train_records(self) -> list[Record]:
        return self.splits[0]

    @property
    def eval_records(self) -> list[Record]:
        return self.splits[1] if self.cfg.eval.split == "eval" else self.splits[0]

    @cached_property
    def task(self) -> Any:
        return build_task(self.cfg.task)

    def write_prompts(self) -> Path | None:
        """``prompts/student.jsonl`` ({id, split, prompt}: each train and eval question as the student reads
        it, after a local student's chat template, which may add text of its own) and
        ``prompts/teacher.jsonl`` ({id, messages}: the training questions as sent to the teacher; an
        openai completions endpoint gets {id, prompt}, the plain text). Once per Run, main process only."""
        if getattr(self, "_prompts_written", False) or not self.writer:
            return None
        from .generators.base import render_plain
        from .models import render_prompt
        from .store import atomic_write_text

        def shown(cfg: Any, tok: Any, messages: list[dict[str, str]]) -> dict[str, Any]:
            if tok is not None:
                return {"prompt": render_prompt(tok, messages)}
            if cfg.kind == "openai" and cfg.endpoint == "completions":
                return {"prompt": render_plain(messages)}
            return {"messages": messages}

        def write(path: Path, rows: list[dict[str, Any]]) -> None:  # unchanged: left alone (a rerun writes nothing)
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                atomic_write_text(path, text)

        scfg = self.cfg.student
        tok = load_tokenizer(scfg.model, trust_remote_code=scfg.trust_remote_code) if scfg.kind in ("hf", "vllm") else None
        train, held_out = self.splits
        student = [{"id": r.id, "split": split, **shown(scfg, tok, self.task.messages(r))}
                   for split, records in (("train", train), ("eval", held_out)) for r in records]
        write(self.dir / "prompts" / "student.jsonl", student)
        write(self.dir / "prompts" / "teacher.jsonl",
              [{"id": r.id, **shown(self.cfg.teacher, None, self.task.messages(r))} for r in train])
        self._prompts_written = True
        return self.dir / "prompts" / "student.jsonl"

    def task_fingerprint(self) -> Any:
        """What about the prompt and the answer check a stored trace depends on."""
        t = self.cfg.task
        return {"kind": t.kind, "custom": t.custom, "system": t.system_prompt, "instruction": t.instruction}

    # ---- stages -------------------------------------------------------------------------------

    def teacher_store(self) -> TraceStore:
        cfg = self.cfg.teacher
        name = f"{cfg.kind}:{cfg.model or cfg.path or 'scripted'}"
        settings = sampling_settings(name, cfg.sampling, self.task_fingerprint())
        if cfg.kind == "scripted":
            settings["error_rate"] = cfg.error_rate
        return self._open_store(self.dir / "teacher" / "traces.jsonl", settings)

    def teacher(self, generator: Generator | None = None) -> SampleSummary:
        """Sample and verify ``teacher.sampling.samples`` traces per training question.

        Raises :class:`UserError` when no teacher server can be reached (nothing stored), and, after
        storing what arrived, when more than ``teacher.max_failed_share`` of the requests failed for good.
        """
        store = self.teacher_store()
        k = self.cfg.teacher.sampling.samples
        if generator is None and any(store.count(r.id) < k for r in self.train_records):
            generator = distributed.sharded(build_generator(self.cfg.teacher, self.train_records, self.cfg.task.kind,
                                                            self.cfg.teacher.sampling.seed, progress=self.progress,
                                                            role="teacher"))
        try:
            summary = self._sample(store, generator, self.cfg.teacher.sampling, "teacher",
                                   max_failed_share=self.cfg.teacher.max_failed_share)
        except UserError as e:  # the generators word their fields generator.FIELD; here it is teacher.FIELD
            import re

            text = re.sub(r"(?<![\w./-])generator\.(?=[a-z_]+)", "teacher.", str(e))
            if text == str(e):
                raise
            raise UserError(text) from None
        return summary

    def student_store(self, epoch: int, generator_name: str | None = None) -> TraceStore:
        cfg = self.cfg.student
        name = generator_name or f"{cfg.kind}:{cfg.model}"
        settings = sampling_settings(name, cfg.sampling, self.task_fingerprint())
        return self._open_store(self.dir / "student" / f"epoch_{epoch}.jsonl", settings)

    def _open_store(self, path: Path, settings: dict[str, Any]) -> TraceStore:
        """The main process opens (and repairs) a store first; the others then read it, read-only."""
        return distributed.main_first(
            lambda: TraceStore(path, settings_hash(settings), overwrite=self.overwrite, writer=self.writer))

    def student(self, epoch: int = 1, generator: Generator | None = None, records: list[Record] | None = None) -> SampleSummary:
        """Sample the student's traces before ``epoch`` (epoch 1: the initial student)."""
        records = self.train_records if records is None else records
        store = self.student_store(epoch, None if generator is None or epoch == 1 else generator.name)
        k = self.cfg.student.sampling.samples
        if generator is None and any(store.count(r.id) < k for r in records):
            generator = distributed.sharded(
                build_generator(self.cfg.student, records, self.cfg.task.kind, self.cfg.seed, progress=self.progress,
                                role="student"))
        self.write_prompts()
        return self._sample(store, generator, self.cfg.student.sampling, f"student/epoch_{epoch}", records)

    def train(self) -> dict[str, Any]:
        """Train every epoch not yet in a complete checkpoint (see ``recipe.py``)."""
        from .recipe import Distiller

        self.write_prompts()
        return Distiller(self).train()

    def evaluate(self, epoch: int, model: Any = None, tokenizer: Any = None) -> EvalSummary:
        """Greedy evaluation of the student after ``epoch`` (0: before training); cached on disk."""
        split = self.cfg.eval.split
        key = _eval_key(split, epoch)
        path = self.dir / "eval" / f"{key}.jsonl"
        summaries = self.eval_summaries()
        if path.exists() and key in summaries:
            return EvalSummary.from_dict(summaries[key])
        if model is None:
            model, tokenizer = self.load_student_for_eval(epoch)
        gen = distributed.sharded(HFGenerator.from_model(model, tokenizer, name=f"hf:student@epoch_{epoch}",
                                                         batch_size=self.cfg.eval.batch_size, progress=self.progress))
        ecfg = self.cfg.eval
        rows, summary = evaluate(self.eval_records, self.task, gen, ecfg.max_tokens, ecfg.self_consistency,
                                 ecfg.temperature, seed=self.cfg.seed)
        if self.writer:
            atomic_write_jsonl(path, rows)
            summaries = self.eval_summaries()
            summaries[key] = {**summary.as_dict(), "epoch": epoch, "split": split,
                              "tokens_per_s": gen.stats.completion_tokens / gen.stats.seconds if gen.stats.seconds else 0.0}
            atomic_write_json(self.dir / "eval" / "summary.json", summaries)
        self.metrics.log("eval", key=key, **summary.as_dict())
        distributed.barrier()  # the other ranks read summary.json next time
        return summary

    def eval_summaries(self) -> dict[str, Any]:
        path = self.dir / "eval" / "summary.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def load_student_for_eval(self, epoch: int) -> tuple[Any, Any]:
        scfg = self.cfg.student
        tok = load_tokenizer(scfg.model, trust_remote_code=scfg.trust_remote_code)
        if epoch == 0:
            return load_model(scfg.model, dtype=scfg.dtype, trust_remote_code=scfg.trust_remote_code, device=scfg.device), tok
        ckpt = checkpoint_dir(self.dir, epoch)
        exported = self.dir / "model"
        if not (ckpt / "state.json").is_file() and epoch == self.cfg.train.epochs and (exported / "config.json").is_file():
            # checkpoints removed (compare does) but the final model was exported: that is this epoch
            return load_model(str(exported), dtype=scfg.dtype, trust_remote_code=scfg.trust_remote_code, device=scfg.device), tok
        if not (ckpt / "state.json").is_file():
            raise UserError(f"no complete checkpoint for epoch {epoch} in {ckpt.parent}; run `orpo-distill train` first")
        if self.cfg.train.lora.enabled:
            from peft import PeftModel

            base = load_model(scfg.model, dtype=scfg.dtype, trust_remote_code=scfg.trust_remote_code, device=scfg.device)
            return PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload(), tok
        return load_model(str(ckpt), dtype=scfg.dtype, trust_remote_code=scfg.trust_remote_code, device=scfg.device), tok

    def run_all(self) -> dict[str, Any]:
        """Every stage in order; each skips what is already complete."""
        from .recipe import uses_student_negatives

        out: dict[str, Any] = {"teacher": self.teacher()}
        if uses_student_negatives(self.cfg):
            out["student"] = self.student(epoch=1)
        if self.cfg.eval.before_training:
            out["eval_before"] = self.evaluate(0)
        out["train"] = self.train()
        last = self.cfg.train.epochs
        out["eval_after"] = self.evaluate(last)
        return out

    def _sample(self, store: TraceStore, generator: Generator | None, sampling: Any, stage: str,
                records: list[Record] | None = None, max_failed_share: float | None = None) -> SampleSummary:
        records = self.train_records if records is None else records
        summary = sample_traces(records, self.task, generator, sampling, store, stage, progress=self.progress)
        distributed.barrier()  # the main process has appended the last chunk: every rank may read the store
        if summary.new_samples or summary.failed_requests:  # a rerun that found it all on disk is no event
            self.metrics.log("sampling", **summary.as_dict())
        if max_failed_share is not None and summary.failed_requests > max_failed_share * summary.requests:
            from .sampling import failed_requests_message

            raise UserError(failed_requests_message(summary, store.path, stage, max_failed_share))
        return summary


def _make_run_dir(path: Path) -> None:
    """Create the run directory; a file where it or a folder above it should be is the user's to move."""
    if path.exists() and not path.is_dir():
        raise UserError(f"run_dir {path} exists and is not a directory; choose another run_dir or move the file")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"run_dir {path}: {parent} is a file, not a directory; choose another run_dir")
    path.mkdir(parents=True, exist_ok=True)


def _eval_key(split: str, epoch: int) -> str:
    return f"{split}_epoch_{epoch}"
