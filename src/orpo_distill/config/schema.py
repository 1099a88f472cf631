"""The pydantic models of a run's configuration, one per section; every field's help text is its
``Field(description=...)`` (the config reference in docs/configuration.md is generated from them, ``reference.py``).

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..errors import UserError
from .base import Strict
from .generators import (
    GeneratorConfig,
    HFGeneratorConfig,
    LocalModelConfig,
    ScriptedGeneratorConfig,
)

class SyntheticConfig(Strict):
    """The built-in word-problem task (see ``datasets/synthetic.py``)."""

    steps: int = Field(2, ge=1, le=8, description="arithmetic operations per problem")
    max_value: int = Field(20, ge=2, description="largest starting quantity")
    num_choices: int = Field(4, ge=2, le=8, description="options per question")


class DatasetConfig(Strict):
    kind: Literal["synthetic", "gsm8k", "jsonl", "hf"] = Field(
        "synthetic",
        description="synthetic (built in), gsm8k (local files), jsonl (field map), hf (Hub id or saved folder)",
    )
    path: str | None = Field(None, description="jsonl/gsm8k: a file; hf: a Hub id or a local dataset folder")
    train_path: str | None = Field(None, description="optional separate file or split for training")
    eval_path: str | None = Field(None, description="optional separate file or split for evaluation")
    hf_config: str | None = Field(None, description="hf: dataset configuration name")
    train_split: str = Field("train", description="hf/gsm8k: name of the training split")
    eval_split: str = Field("test", description="hf/gsm8k: name of the held-out split")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="map from our names (id, question, answer, choices) to the source's field names",
    )
    train_size: int | None = Field(None, ge=1, description="cap on training questions (None: all)")
    eval_size: int | None = Field(None, ge=1, description="cap on held-out questions (None: all)")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share when the source has one split")
    dev_size: int | None = Field(
        None, ge=1,
        description="carve a dev split of this many questions out of the held-out set, beside eval_size test "
                    "questions: per-epoch evaluations (the curves, any choice a person tunes) then run on dev, and "
                    "the test split is evaluated before training, after the last epoch and at the best dev epoch "
                    "(None: one held-out split for everything)",
    )
    synthetic: SyntheticConfig = SyntheticConfig()
    seed: int = Field(0, description="seed of the synthetic task and of the train/eval split")


class TaskConfig(Strict):
    kind: Literal["mcq", "numeric", "yesno", "exact", "custom"] = Field(
        "mcq",
        description="how answers are extracted and checked",
    )
    custom: str | None = Field(None, description="custom task as 'module:function' (needs allow_custom_code)")
    allow_custom_code: bool = Field(False, description="must be true for task.custom to import user code")
    system_prompt: str | None = Field(None, description="optional system message before every question")
    instruction: str | None = Field(None, description="override the task's answer-format instruction")

    @model_validator(mode="after")
    def _custom_needs_name(self) -> "TaskConfig":
        if self.kind == "custom" and not self.custom:
            raise ValueError("task.kind 'custom' needs task.custom: 'module:function'")
        return self


class PairsConfig(Strict):
    negatives: Literal["student", "teacher", "both"] = Field(
        "student",
        description="where rejected responses come from: student, teacher or both",
    )
    filter: Literal["incorrect", "any"] = Field(
        "incorrect",
        description="student negatives: incorrect samples only, or any sample",
    )
    pairing: Literal["capped", "every_positive"] = Field(
        "capped",
        description="capped: up to pairs_per_question pairs a question; every_positive: one pair per correct teacher "
                    "trace (negatives reused when fewer), so the chosen side is exactly what sft-diverse trains on",
    )
    pairs_per_question: int = Field(
        2, ge=1,
        description="capped pairing: pairs per question per epoch (positives cycle, negatives drawn without replacement)",
    )
    no_negative: Literal["drop", "teacher", "nll"] | list[Literal["teacher", "nll"]] = Field(
        "drop",
        description="a question whose negative pool is empty: drop it from the epoch (counted); teacher: pair it with "
                    "the teacher's wrong traces; nll: train its positives (the ones its pairs would have used) on the "
                    "NLL term alone, as NLL-only rows; a list such as [teacher, nll] tries each in turn. A question no "
                    "fallback covers is dropped and counted",
    )
    dedup_rouge_l: float | None = Field(
        None, gt=0, le=1,
        description="discard a trace whose ROUGE-L F with an already kept trace of the same question and kind "
                    "(correct or wrong) exceeds this, teacher traces and student samples alike, counted in the "
                    "dedup and refresh events (the paper: 0.8; None keeps every trace)",
    )
    rejected_span: Literal["whole", "first_error"] = Field(
        "whole",
        description="the tokens of a rejected trace the odds-ratio term reads: whole (the paper), or first_error: "
                    "from its first wrong step on (the task's first_error: a wrong equation; for mcq also a value "
                    "given the wrong option), so the correct prefix it shares with the positives is not pushed "
                    "down; a trace with no located error stays whole. Counted in the pairs event",
    )
    max_similarity: float | None = Field(
        None, gt=0, le=1,
        description="leave out a negative whose ROUGE-L F with any positive of its question exceeds this (a "
                    "diagnostic of the shared-token mechanism, Razin et al. 2024, arXiv 2410.08847); counted in the "
                    "pairs event. None: keep every negative",
    )
    seed: int = Field(0, description="seed of the pairing")

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """``no_negative`` as the fallbacks to try in order (none for ``drop``)."""
        if isinstance(self.no_negative, list):
            return tuple(self.no_negative)
        return () if self.no_negative == "drop" else (self.no_negative,)


class LoraConfig(Strict):
    enabled: bool = Field(False, description="train a LoRA adapter (PEFT) instead of all weights")
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | str = Field("all-linear", description="modules to adapt (PEFT names, or all-linear)")
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, double quantization, bf16 compute); "
        "needs lora.enabled, a CUDA GPU and `pip install 'orpo-distill[qlora]'`",
    )

    @model_validator(mode="after")
    def _four_bit_needs_lora(self) -> "LoraConfig":
        if self.load_in_4bit and not self.enabled:
            raise ValueError("train.lora.load_in_4bit needs train.lora.enabled: true (QLoRA trains a LoRA adapter "
                             "on the 4-bit base; the base itself cannot be trained in 4-bit)")
        return self


class PhiRamp(Strict):
    """``phi: {linear: [START, END]}``: START at the refresh before epoch 2, END at the one before the last."""

    linear: tuple[float, float] = Field(description="phi before epoch 2 and before the last epoch")


Phi = float | list[float] | PhiRamp


def _phi_values(phi: Any) -> list[float]:
    """The phi values of a setting or of its YAML form ({linear: [a, b]} as a dict)."""
    if isinstance(phi, PhiRamp):
        return list(phi.linear)
    if isinstance(phi, dict):
        return [float(x) for x in phi.get("linear", [])]
    return [float(x) for x in phi] if isinstance(phi, (list, tuple)) else [float(phi)]


def phi_policy(phi: Any) -> Literal["off", "on", "mixed"]:
    """What a phi setting amounts to: off (never resampled), on (all resampled every time) or mixed."""
    values = set(_phi_values(phi))
    return "off" if values == {0.0} else "on" if values == {1.0} else "mixed"


def phi_text(phi: Any) -> str:
    """``0.5``, ``0.1, 0.5`` (one per refresh) or ``linear 0.1 to 0.5``."""
    values = ", ".join(f"{x:g}" for x in _phi_values(phi))
    ramp = isinstance(phi, PhiRamp) or isinstance(phi, dict)
    return f"linear {values.replace(', ', ' to ')}" if ramp else values


def upgrade_train_section(data: Any) -> Any:
    """A ``train`` section with the settings phi replaced (``policy``, ``phi_schedule``, ``phi_start``)
    rewritten as the ``phi`` they meant; anything else is returned as it is."""
    if not isinstance(data, dict) or not {"policy", "phi_schedule", "phi_start"} & data.keys():
        return data
    data = dict(data)
    policy = data.pop("policy", "mixed")
    policy = {False: "off", True: "on"}.get(policy, policy) if isinstance(policy, bool) else policy
    schedule = data.pop("phi_schedule", "constant")
    start = data.pop("phi_start", 0.0)
    if policy not in ("off", "on", "mixed"):
        raise ValueError(f"train.policy (replaced by train.phi) must be 'off', 'on' or 'mixed', got {policy!r}")
    if schedule not in ("constant", "linear"):
        raise ValueError(f"train.phi_schedule (replaced by train.phi) must be 'constant' or 'linear', got {schedule!r}")
    if policy != "mixed":
        data["phi"] = 0.0 if policy == "off" else 1.0
    elif schedule == "linear" and not isinstance(data.get("phi", 0.5), (list, dict)):
        data["phi"] = {"linear": [start, data.get("phi", 0.5)]}
    return data


class TrainConfig(Strict):
    method: Literal["orpo", "sft"] = Field("orpo", description="orpo (preference) or sft (teacher positives only)")
    traces: Literal["single", "all"] = Field("all", description="sft: one teacher trace per question, or all positives")
    phi: Phi = Field(
        0.5,
        description="share of questions whose student negatives are resampled before each epoch after the "
                    "first: 0 off-policy, 1 on-policy, between mixed; a list gives one value per refresh; "
                    "{linear: [start, end]} ramps",
    )
    unrefreshed: Literal["previous", "initial"] = Field(
        "previous",
        description="at a refresh, the student negatives of a question not resampled: previous keeps what it trained "
                    "on last epoch; initial returns to the initial student's (the paper's mixed policy, anchored to "
                    "the initial student for diversity). The same with two epochs",
    )
    when_all_correct: Literal["keep", "teacher"] = Field(
        "keep", description="refreshed question with no wrong student sample: keep old negatives or use teacher's"
    )
    epochs: int = Field(2, ge=1, description="training epochs; the refresh runs before each epoch after the first")
    sft_epochs: int = Field(
        0, ge=0,
        description="orpo: train the first N epochs on the NLL term alone, on every correct teacher trace (what "
                    "sft-diverse trains on), then sample every question's negatives from that SFT'd student and "
                    "train the remaining epochs with the odds-ratio term (SFT first, then the term: arXiv "
                    "2502.01237, 2505.24850). The refreshes and phi then count from epoch N+1, and "
                    "unrefreshed: initial returns to the SFT'd student's negatives. 0: the term from epoch 1",
    )
    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lambda_or: float = Field(0.1, ge=0, alias="lambda", description="weight of the odds-ratio term")
    protect_chosen: float = Field(
        0.0, ge=0,
        description="orpo: subtract this times max(0, l_ref(y_w) - l(y_w)) from each pair's odds-ratio logit, where "
                    "l_ref is the chosen trace's mean log-probability under the weights the term started from "
                    "(DPO-Positive, arXiv 2402.13228): the term stops widening a margin bought by pushing the "
                    "correct trace down. Logged as chosen_drop. 0: plain ORPO",
    )
    nll_on_prompt: bool = Field(False, description="also count prompt tokens in the NLL term (what TRL does)")
    batch_size: int = Field(8, ge=1, description="pairs per micro-batch")
    token_budget: int | None = Field(
        None, ge=16, description="also cap a micro-batch at this many packed tokens (None: pairs only)"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    chunk_tokens: int | None = Field(
        None, ge=16,
        description="compute each micro-batch's forward and backward in chunks of whole questions (or SFT examples) "
                    "of at most this many packed tokens, gradients summed: the same optimizer step with activation "
                    "memory for one chunk only (SmolLM2-135M: about 1.4 MB a token); a question longer than this is "
                    "one chunk. None: the whole micro-batch at once. Not with DeepSpeed",
    )
    pad_multiple: int = Field(
        1, ge=1,
        description="round each micro-batch's padded width up to a multiple of this: fewer distinct shapes for the "
                    "CPU's oneDNN primitive cache to build and keep (its memory climbs with each new shape: "
                    "docs/benchmarks.md), for the padding's compute. Padding is masked: the same step (in bf16, up to the "
                    "kernels' rounding, which can depend on the shape). 1: no rounding",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps spent warming up the learning rate")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate decay after warmup")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bf16 autocast where the GPU or CPU has bf16 units; loss in fp32 always",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    layout: Literal["packed", "plain"] = Field(
        "packed", description="packed: one row per question, prompt shared by its pairs; plain: TRL's layout"
    )
    max_length: int = Field(1024, ge=8, description="prompt + response tokens; longer pairs are truncated")
    pairs_per_row: int | None = Field(
        None, ge=1, description="at most this many of a question's pairs in one packed row (None: all of them, "
        "the prompt held once; 1: every pair its own row, shuffled across questions as SFT's examples are)",
    )
    lora: LoraConfig = LoraConfig()
    log_every: int = Field(1, ge=1, description="log a metrics line every N optimizer steps")
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
                            "swanlab"]] = Field(
        default_factory=list,
        description="experiment trackers (through Accelerate) that also get the training figures of metrics.jsonl: "
                    "every logged step as train/*, epoch times, and the per-epoch evaluations as eval/<split>/*; "
                    "TensorBoard writes to RUN/trackers. A tracker's package must be installed (refused up front "
                    "with the pip command). Not a training setting: changing it retrains nothing",
    )
    seed: int = Field(0, description="seed of the data order")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _legacy_phi_settings(cls, data: Any) -> Any:
        """The settings phi replaced, still read so that older configs and comparison plans load:
        ``policy`` (off: phi 0, on: phi 1, mixed: phi as given; YAML 1.1's unquoted off/on arrive as
        false/true) and ``phi_schedule: linear`` with ``phi_start`` (phi {linear: [phi_start, phi]})."""
        return upgrade_train_section(data)

    @field_validator("phi")
    @classmethod
    def _phi_range(cls, v: Phi) -> Phi:
        for x in _phi_values(v):
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"phi must be between 0 and 1, got {x}")
        if isinstance(v, list) and not v:
            raise ValueError("a phi list needs one value per refresh (epochs 2, 3, ...), got none")
        return v

    @model_validator(mode="after")
    def _sft_epochs_leave_the_term_an_epoch(self) -> "TrainConfig":
        if self.sft_epochs and self.method != "orpo":
            raise ValueError("train.sft_epochs is for method orpo (SFT first, then the odds-ratio term); "
                             "method sft trains every epoch on the NLL term already")
        if self.sft_epochs >= self.epochs:
            raise ValueError(f"train.sft_epochs ({self.sft_epochs}) must be below train.epochs ({self.epochs}): "
                             "at least one epoch trains with the odds-ratio term")
        return self

    @property
    def policy(self) -> Literal["off", "on", "mixed"]:
        """What phi amounts to: off (never resampled), on (all resampled every time) or mixed."""
        return phi_policy(self.phi)


class EvalConfig(Strict):
    split: Literal["eval", "train"] = Field(
        "eval",
        description="evaluate on the held-out split (eval) or on the training questions",
    )
    max_tokens: int = Field(256, ge=1, description="longest response in tokens")
    batch_size: int = Field(32, ge=1, description="sequences per generation batch")
    every_epoch: bool = Field(True, description="evaluate after every epoch, not only the last")
    before_training: bool = Field(True, description="evaluate the initial student (epoch 0) in `run`")
    self_consistency: int = Field(0, ge=0, description="k samples for self-consistency@k (0: off)")
    temperature: float = Field(0.7, ge=0, description="sampling temperature for self-consistency")


class RunConfig(Strict):
    run_dir: str = Field("runs/default", description="the run directory: every stage reads and writes here")
    seed: int = Field(0, description="seed for data order, refresh choice, pairing and sampling")
    dataset: DatasetConfig = DatasetConfig()
    task: TaskConfig = TaskConfig()
    teacher: GeneratorConfig = ScriptedGeneratorConfig()
    student: GeneratorConfig = HFGeneratorConfig(model="builtin:smollm2-135m-instruct")
    pairs: PairsConfig = PairsConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _partial_generator_sections(cls, data: Any) -> Any:
        """A teacher or student section naming neither ``kind`` nor ``model`` refines the default
        generator (scripted teacher, builtin student) instead of starting from a bare ``hf`` one with no
        model, so ``--set teacher.sampling.samples=8`` alone works."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in ("teacher", "student"):
            section = data.get(name)
            if isinstance(section, dict) and "kind" not in section and "model" not in section:
                default = cls.model_fields[name].default
                model = getattr(default, "model", None)
                base = {"kind": default.kind, **({"model": model} if model else {})}
                data[name] = {**base, **section}
        return data

    @model_validator(mode="after")
    def _four_bit_student_weights(self) -> "RunConfig":
        if self.train.lora.load_in_4bit and self.student.kind == "vllm" and self.samples_student_in_training:
            raise ValueError(
                "train.lora.load_in_4bit with student.kind 'vllm': the refresh copies the student's weights into "
                "the vLLM engine, which cannot take 4-bit weights; use student.kind: hf, or train.phi: 0 with train.sft_epochs: 0")
        return self

    @property
    def samples_student_in_training(self) -> bool:
        """Whether training samples negatives from the student it is training: student negatives, and either
        an SFT stage first (``train.sft_epochs``, whose student gives the term's negatives) or a refresh
        (more than one epoch of the term, a phi that is not 0)."""
        t = self.train
        if t.method != "orpo" or self.pairs.negatives == "teacher":
            return False
        return t.sft_epochs > 0 or (t.epochs > 1 and t.policy != "off")

    @property
    def local_student(self) -> LocalModelConfig:
        """The student section when it loads weights itself (``hf``, ``vllm``), as training and evaluation
        need; a UserError for a student that only samples (``openai``, ``replay``, ``scripted``)."""
        if not isinstance(self.student, LocalModelConfig):
            raise UserError(
                f"student.kind is {self.student.kind!r}: training and evaluation load the student's weights "
                "(student.model), so they need student.kind hf or vllm; a student of this kind can only give its "
                "samples (`orpo-distill student`)")
        return self.student

    @property
    def path(self) -> Path:
        return Path(self.run_dir)
