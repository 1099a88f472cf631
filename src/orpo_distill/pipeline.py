"""A run: one directory, one config, and the stages that read and write files in it.

Each stage is safe to call again: it skips what is already on disk and does only what is missing.
``run_all`` calls them in order. The stages live in their own modules (``sampling``, ``epoch_rows``,
``recipe``, ``evaluation``) and receive what they use; this class composes them with the run folder
(``layout.RunLayout``), the config and the metrics log. See docs/architecture.md.

Every output carries the hash of the settings that made it: the trace stores their sampling settings',
checkpoints and ``model/`` the training settings' (``provenance.py``), each evaluation its own. A rerun
whose training settings changed sets the old trained outputs aside (``checkpoints.old``, ...) and trains
again, saying so; ``reuse`` keeps them on purpose. A changed evaluation setting re-evaluates only.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import distributed, provenance
from .allocator import release_free_memory
from .config import LocalModelConfig, RunConfig, resolved_dict
from .errors import UserError
from .evaluation import EvalSummary, base_splits, best_dev_epoch, evaluate
from .datasets import Splits, load_all_splits
from .generators import build_generator
from .generators.base import Generator
from .generators.hf import HFGenerator, autocast_for
from .layout import STATE, RunLayout, eval_key, student_generator_name
from .metrics import MetricsLog
from .models import load_model, load_tokenizer, pick_device
from .records import Record
from .sampling import SampleSummary, sample_traces
from .store import TraceStore, atomic_write_json, atomic_write_jsonl, atomic_write_text, settings_hash
from .tasks import build_task


class Run:
    """``overwrite``: set aside trace stores made with other sampling settings instead of refusing.
    ``reuse``: keep checkpoints, the model and evaluations made with other training settings."""

    def __init__(self, cfg: RunConfig, overwrite: bool = False, progress: bool = True, reuse: bool = False):
        self.cfg = cfg
        self.layout = RunLayout(Path(cfg.run_dir))
        self.overwrite = overwrite
        self.reuse = reuse
        # Under `accelerate launch` every process runs this; only the main one writes (distributed.py)
        if distributed.world_size() > 1:  # (one process: no device question asked here)
            device = cfg.student.device if isinstance(cfg.student, LocalModelConfig) else "auto"  # a remote student: auto
            distributed.init(cpu=pick_device(device).type == "cpu")
        self.writer = distributed.is_main()
        self.progress = progress and self.writer
        # weights trained with other settings are set aside before anything is written, so that config.yaml
        # never records settings the folder's model was not trained with
        changes = provenance.check_trained_outputs(self.layout, cfg, reuse, self.writer)
        if self.writer:
            _make_run_dir(self.dir)
            if not self._stores_conflict():  # the trace stage refuses such a rerun: keep the folder's config
                _save_config(cfg, self.layout.config)
        distributed.barrier()
        self.metrics = MetricsLog(self.layout.metrics, enabled=self.writer)
        if changes:
            self.metrics.log("set_aside", reason="training settings changed", changes=changes,
                             set_aside=[p.name + ".old" for p in self.layout.trained_outputs()])

    @property
    def dir(self) -> Path:
        return self.layout.root

    def _stores_conflict(self) -> bool:
        """Whether a trace store in the folder holds other settings than this config's (and no --overwrite)."""
        if self.overwrite:
            return False
        for path, settings in ((self.layout.teacher_traces, provenance.teacher_store_settings(self.cfg)),
                               (self.layout.student_samples(1), provenance.student_store_settings(self.cfg))):
            stored = provenance.stored_hash(path)
            if stored is not None and stored != settings_hash(settings):
                return True
        return False

    # ---- inputs -------------------------------------------------------------------------------

    @cached_property
    def splits(self) -> Splits:
        splits = load_all_splits(self.cfg.dataset, task_kind=self.cfg.task.kind)
        if not splits.train:
            raise UserError("the dataset has no training questions (check dataset.path, fields and train_size)")
        for r in [*splits.train, *splits.eval, *splits.dev]:  # bad gold fails here, before anything is generated
            self.task.normalize_gold(r)
        return splits

    @property
    def train_records(self) -> list[Record]:
        return self.splits[0]

    @property
    def eval_records(self) -> list[Record]:
        return self.splits.eval if self.cfg.eval.split == "eval" else self.splits.train

    @property
    def dev_records(self) -> list[Record]:
        """The dev split (``dataset.dev_size``; empty without one)."""
        return self.splits.dev

    def records_of(self, split: str) -> list[Record]:
        return self.dev_records if split == "dev" else self.eval_records

    @property
    def epoch_split(self) -> str:
        """Where the per-epoch evaluations run: dev when there is one, else ``eval.split``."""
        return "dev" if self.dev_records else self.cfg.eval.split

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
        local = isinstance(scfg, LocalModelConfig)
        tok = load_tokenizer(scfg.model, trust_remote_code=scfg.trust_remote_code) if local else None
        train, held_out, dev = self.splits
        student = [{"id": r.id, "split": split, **shown(scfg, tok, self.task.messages(r))}
                   for split, records in (("train", train), ("eval", held_out), ("dev", dev)) for r in records]
        write(self.layout.prompts("student"), student)
        write(self.layout.prompts("teacher"),
              [{"id": r.id, **shown(self.cfg.teacher, None, self.task.messages(r))} for r in train])
        self._prompts_written = True
        return self.layout.prompts("student")

    def task_fingerprint(self) -> Any:
        """What about the prompt and the answer check a stored trace depends on."""
        return provenance.task_fingerprint(self.cfg)

    # ---- stages -------------------------------------------------------------------------------

    def teacher_store(self) -> TraceStore:
        return self._open_store(self.layout.teacher_traces, provenance.teacher_store_settings(self.cfg))

    def teacher(self, generator: Generator | None = None) -> SampleSummary:
        """Sample and verify ``teacher.sampling.samples`` traces per training question.

        Raises :class:`UserError` when no teacher server can be reached (nothing stored), and, after
        storing what arrived, when more than ``teacher.max_failed_share`` of the requests failed for good.
        """
        store = self.teacher_store()
        k = self.cfg.teacher.sampling.samples
        if generator is None and any(store.count(r.id) < k for r in self.train_records):
            generator = distributed.split_across_ranks(build_generator(self.cfg.teacher, self.train_records, self.cfg.task.kind,
                                                            self.cfg.teacher.sampling.seed, progress=self.progress,
                                                            role="teacher"))
        with _config_section("teacher"):
            summary = self._sample(store, generator, self.cfg.teacher.sampling, "teacher",
                                   max_failed_share=self.cfg.teacher.max_failed_share)
        generator = None  # a local teacher's model: freed before the next stage
        release_free_memory()
        if self.dev_records:
            self.teacher_dev()
        return summary

    def teacher_dev_store(self) -> TraceStore:
        return self._open_store(self.layout.teacher_dev_traces, provenance.teacher_store_settings(self.cfg, samples=1))

    def teacher_dev(self) -> SampleSummary:
        """One teacher trace per dev question (``teacher/dev_traces.jsonl``): the held-out positives whose
        log-probability each per-epoch dev evaluation reports (``chosen_logp``). Never trained on."""
        store = self.teacher_dev_store()
        sampling = self.cfg.teacher.sampling.model_copy(update={"samples": 1})
        generator = None
        if any(store.count(r.id) < 1 for r in self.dev_records):
            generator = distributed.split_across_ranks(build_generator(self.cfg.teacher, self.dev_records, self.cfg.task.kind,
                                                                sampling.seed, progress=self.progress, role="teacher"))
        with _config_section("teacher"):
            return self._sample(store, generator, sampling, "teacher/dev", self.dev_records,
                                max_failed_share=self.cfg.teacher.max_failed_share)

    def dev_positives(self) -> list[tuple[list[dict[str, str]], str]]:
        """(prompt messages, text) of each dev question's teacher trace that is correct and finished."""
        from .pairs import positives

        rows = self.teacher_dev_store().all_rows() if self.layout.teacher_dev_traces.is_file() else []
        by_id = {r.id: r for r in self.dev_records}
        return [(self.task.messages(by_id[row["id"]]), text) for row in rows if row["id"] in by_id
                for text in positives([row])]

    def student_store(self, epoch: int, generator_name: str | None = None) -> TraceStore:
        settings = provenance.student_store_settings(self.cfg, generator_name)
        return self._open_store(self.layout.student_samples(epoch), settings)

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
            generator = distributed.split_across_ranks(
                build_generator(self.cfg.student, records, self.cfg.task.kind, self.cfg.seed, progress=self.progress,
                                role="student"))
        self.write_prompts()
        with _config_section("student"):
            summary = self._sample(store, generator, self.cfg.student.sampling, f"student/epoch_{epoch}", records)
        generator = None  # the sampler's model (the initial student's; a refresh's is the training model, kept)
        release_free_memory()
        return summary

    def sample_refresh(self, epoch: int, generator: Generator, records: Sequence[Record]) -> dict[str, list[dict[str, Any]]]:
        """The refresh's sampler: ``generator`` (the current weights) samples ``records`` into
        ``student/epoch_E.jsonl``; returns their samples by question."""
        self.student(epoch=epoch, generator=generator, records=list(records))
        store = self.student_store(epoch, generator.name)
        return {r.id: store.for_question(r.id) for r in records}

    def distiller(self) -> Any:
        """The training stage, given what it uses (``recipe.TrainingInputs``)."""
        from .recipe import Distiller, TrainingInputs

        inputs = TrainingInputs(records=self.train_records, messages=self.task.messages,
                                teacher_rows=self.teacher_store().all_rows(),
                                student_rows=lambda epoch, name: self.student_store(epoch, name).all_rows(),
                                sample=self.sample_refresh, first_error=self.task.first_error,
                                evaluate=lambda epoch, model, tok: self.evaluate(epoch, model=model, tokenizer=tok,
                                                                                 split=self.epoch_split))
        return Distiller(self.cfg, self.layout, self.metrics, inputs, progress=self.progress)

    def pairs(self) -> tuple[Path, Any]:
        """``pairs/epoch_1.jsonl``, the rows the first epoch trains on (``recipe.EpochData``), after the stages
        they are built from (the teacher's traces; the initial student's samples when the run uses them)."""
        self.inputs()
        d = self.distiller()
        if provenance.uses_initial_student(self.cfg):
            d.buffer = d.initial_buffer()
        data = d.epoch_data(1)
        return d.write_pairs(1, data), data

    def check_training_environment(self) -> None:
        """What training needs that a config cannot check (QLoRA's bitsandbytes and GPU), refused before the
        first stage loads a model rather than after hours of sampling."""
        if self.cfg.train.lora.load_in_4bit:
            from .models import require_4bit_support

            require_4bit_support(self.cfg.local_student.device)

    def sample_student(self, epoch: int = 1) -> SampleSummary:
        """The ``student`` stage: the initial student's samples (epoch 1), or the student after ``epoch - 1``
        (its checkpoint) sampling every question into ``student/epoch_E.jsonl``, the store an ``hf`` student's
        refresh before that epoch fills (a ``vllm`` student's refresh names its store ``vllm:`` and keeps its own)."""
        if epoch <= 1:
            return self.student(epoch=1)
        model, tok = self.load_student_for_eval(epoch - 1)
        generator = HFGenerator.for_student(model, tok, self.cfg.local_student.dtype, student_generator_name(epoch - 1),
                                            self.cfg.student.sampling.batch_size, progress=self.progress)
        return self.student(epoch=epoch, generator=generator)

    def latest_epoch(self) -> int:
        """The newest trained epoch: the latest complete checkpoint's, else the exported model's (the last
        epoch), else 0 (the initial student): what ``eval`` evaluates when no epoch is named."""
        from .checkpoints import latest_checkpoint
        from .layout import epoch_of

        ckpt = latest_checkpoint(self.dir)
        if ckpt is not None:
            return epoch_of(ckpt) or 0
        return self.cfg.train.epochs if self.layout.has_model() else 0

    def inputs(self) -> dict[str, SampleSummary]:
        """The stages training reads, in order: the teacher's traces, then the initial student's samples when
        the run trains on them (``provenance.uses_initial_student``); each skips what is complete."""
        out = {"teacher": self.teacher()}
        if provenance.uses_initial_student(self.cfg):
            out["student"] = self.student(epoch=1)
        return out

    def train(self) -> dict[str, Any]:
        """Train every epoch not yet in a complete checkpoint (see ``recipe.py``)."""
        self._refuse_removed_weights()
        self.write_prompts()
        return self.distiller().train(reuse=self.reuse)

    def _refuse_removed_weights(self) -> None:
        """A finished comparison run whose weights compare removed: training again would overwrite the
        evaluations the comparison counted, with no checkpoint to start from."""
        if self.layout.model_removed.is_file() and not self.layout.has_model():
            raise UserError(f"{self.layout.root}: this run finished and `orpo-distill compare` removed its weights "
                            f"({self.layout.model_removed.relative_to(self.layout.root)}); its evaluations and metrics "
                            "are kept. For the weights, run the comparison again into a new folder with --keep-models "
                            "(or delete this run folder to train it again)")

    def evaluate(self, epoch: int, model: Any = None, tokenizer: Any = None, split: str | None = None) -> EvalSummary:
        """Greedy evaluation of the student after ``epoch`` (0: before training) on ``split`` (``eval.split``
        unless given; ``dev``: the dev split, with the held-out positives' log-probability); cached on disk."""
        split = split or self.cfg.eval.split
        key = eval_key(split, epoch)
        path = self.layout.eval_rows(split, epoch)
        summaries = self.eval_summaries()
        wanted = settings_hash(provenance.eval_settings(self.cfg, epoch, self.weights_hash(epoch), split=split))
        if path.exists() and key in summaries:
            cached = summaries[key].get("settings_hash")
            if cached is None or cached == wanted:  # None: written before evaluations carried a hash
                return EvalSummary.from_dict(summaries[key])
            self.metrics.log("eval_stale", key=key, cached_hash=cached, settings_hash=wanted,
                             note="cached evaluation was made with other settings or another model: recomputed")
        release_free_memory()  # what the stage before freed (a training epoch's activations)
        if model is None:
            model, tokenizer = self.load_student_for_eval(epoch)
        gen = distributed.split_across_ranks(HFGenerator.for_student(
            model, tokenizer, self.cfg.local_student.dtype, student_generator_name(epoch), self.cfg.eval.batch_size,
            progress=self.progress))
        ecfg = self.cfg.eval
        rows, summary = evaluate(self.records_of(split), self.task, gen, ecfg.max_tokens, ecfg.self_consistency,
                                 ecfg.temperature, seed=self.cfg.seed)
        extra: dict[str, Any] = {}
        if split == "dev":
            from .chosen_logp import mean_response_logp

            held_out = self.dev_positives()
            extra = {"chosen_logp": mean_response_logp(model, tokenizer, held_out, self.cfg.train.max_length,
                                                       bf16=autocast_for(self.cfg.local_student.dtype)),
                     "chosen_logp_n": len(held_out)}
        if self.writer:
            atomic_write_jsonl(path, rows)
            summaries = self.eval_summaries()
            summaries[key] = {**summary.as_dict(), **extra, "epoch": epoch, "split": split, "settings_hash": wanted,
                              "tokens_per_s": gen.stats.completion_tokens / gen.stats.seconds if gen.stats.seconds else 0.0}
            atomic_write_json(self.layout.eval_summary, summaries)
        del gen, model
        release_free_memory()
        self.metrics.log("eval", key=key, **summary.as_dict(), **extra)
        distributed.barrier()  # the other ranks read summary.json next time
        return summary

    def eval_summaries(self) -> dict[str, Any]:
        return self.layout.eval_summaries()

    def weights_hash(self, epoch: int) -> str | None:
        """The training-settings hash recorded with the weights after ``epoch`` (None: before training, or
        weights written before hashes existed)."""
        return provenance.weights_hash(self.layout, epoch, self.cfg.train.epochs)

    def load_student_for_eval(self, epoch: int) -> tuple[Any, Any]:
        scfg = self.cfg.local_student
        tok = load_tokenizer(scfg.model, trust_remote_code=scfg.trust_remote_code)
        if epoch == 0:
            return load_model(scfg.model, dtype=scfg.dtype, trust_remote_code=scfg.trust_remote_code, device=scfg.device), tok
        ckpt = self.layout.checkpoint(epoch)
        exported = self.layout.model
        if not (ckpt / STATE).is_file() and epoch == self.cfg.train.epochs and self.layout.has_model():
            # checkpoints removed (compare does) but the final model was exported: that is this epoch
            return load_model(str(exported), dtype=scfg.dtype, trust_remote_code=scfg.trust_remote_code, device=scfg.device), tok
        if not (ckpt / STATE).is_file():
            if epoch == self.cfg.train.epochs:
                self._refuse_removed_weights()
            raise UserError(f"no complete checkpoint for epoch {epoch} in {ckpt.parent}; run `orpo-distill train` first")
        refused = None if self.reuse else provenance.conflict(
            ckpt, json.loads((ckpt / STATE).read_text(encoding="utf-8")), self.cfg)
        if refused:
            raise UserError(refused)
        if self.cfg.train.lora.enabled:
            from peft import PeftModel

            base = load_model(scfg.model, dtype=scfg.dtype, trust_remote_code=scfg.trust_remote_code, device=scfg.device)
            return PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload(), tok
        return load_model(str(ckpt), dtype=scfg.dtype, trust_remote_code=scfg.trust_remote_code, device=scfg.device), tok

    def run_all(self) -> dict[str, Any]:
        """Every stage in order; each skips what is already complete."""
        self.check_training_environment()
        out: dict[str, Any] = dict(self.inputs())
        if self.cfg.eval.before_training:
            for split in base_splits(self.cfg):
                out["eval_before" if split == self.cfg.eval.split else f"{split}_before"] = self.evaluate(0, split=split)
        out["train"] = self.train()
        last = self.cfg.train.epochs
        self.evaluate_missed_epochs()
        out["eval_after"] = self.evaluate(last)
        best = best_dev_epoch(self.eval_summaries(), last)  # the test split at the epoch dev would pick too
        if best is not None and best != last:
            out["eval_best_dev"] = self.evaluate(best)
        if self.writer:  # model/README.md again, with the final evaluation (the export came before it)
            from .model_card import refresh_model_card

            refresh_model_card(self.cfg, self.layout)
        return out


    def evaluate_missed_epochs(self) -> list[int]:
        """The per-epoch evaluations (``eval.every_epoch``) a kill cut off, between an epoch's checkpoint and
        the end of its evaluation, made now from the checkpoints that are still there: the curves and the
        best dev epoch need every epoch. Returns the epochs evaluated."""
        if not self.cfg.eval.every_epoch:
            return []
        summaries = self.eval_summaries()
        missed = [e for e in range(1, self.cfg.train.epochs + 1)
                  if eval_key(self.epoch_split, e) not in summaries and (self.layout.checkpoint(e) / STATE).is_file()]
        for e in missed:
            self.metrics.log("eval_missed", epoch=e, split=self.epoch_split,
                             note="the run was stopped before this epoch's evaluation ended: made from its checkpoint")
            self.evaluate(e, split=self.epoch_split)
        return missed

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


@contextmanager
def _config_section(role: str) -> Iterator[None]:
    """The generators word their fields ``generator.FIELD``; within a stage it is ``teacher.FIELD`` or
    ``student.FIELD``."""
    try:
        yield
    except UserError as e:
        text = re.sub(r"(?<![\w./-])generator\.(?=[a-z_]+)", role + ".", str(e))
        if text == str(e):
            raise
        raise UserError(text) from None


def _save_config(cfg: RunConfig, path: Path) -> None:
    """The resolved config, written only when it changed (an unchanged rerun leaves the file alone, but
    opens it for appending so that a run folder that cannot be written fails here, naming this file)."""
    import yaml

    text = yaml.safe_dump(resolved_dict(cfg), sort_keys=False)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(path, text)
    else:
        with path.open("ab"):  # nothing written: the mtime stays
            pass


def _make_run_dir(path: Path) -> None:
    """Create the run directory; a file where it or a folder above it should be is the user's to move."""
    if path.exists() and not path.is_dir():
        raise UserError(f"run_dir {path} exists and is not a directory; choose another run_dir or move the file")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"run_dir {path}: {parent} is a file, not a directory; choose another run_dir")
    path.mkdir(parents=True, exist_ok=True)
