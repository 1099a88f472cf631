"""The run configuration: pydantic models of every stage, YAML in, ``--set a.b=c`` overrides.

Unknown keys are errors (a typo must not silently fall back to a default). Validation errors are
turned into one :class:`UserError` that names each wrong field by its dotted path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


class Strict(BaseModel):
    # coerce_numbers_to_str: `run_dir: 2024` or `--set student.model=1234` name a string, not a number
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class SyntheticConfig(Strict):
    """The built-in word-problem task (see ``datasets/synthetic.py``)."""

    steps: int = Field(2, ge=1, le=8, description="arithmetic operations per problem")
    max_value: int = Field(20, ge=2, description="largest starting quantity")
    num_choices: int = Field(4, ge=2, le=8)


class DatasetConfig(Strict):
    kind: Literal["synthetic", "gsm8k", "jsonl", "hf"] = "synthetic"
    path: str | None = Field(None, description="jsonl/gsm8k: a file; hf: a Hub id or a local dataset folder")
    train_path: str | None = Field(None, description="optional separate file or split for training")
    eval_path: str | None = Field(None, description="optional separate file or split for evaluation")
    hf_config: str | None = Field(None, description="hf: dataset configuration name")
    train_split: str = "train"
    eval_split: str = "test"
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="map from our names (id, question, answer, choices) to the source's field names",
    )
    train_size: int | None = Field(None, ge=1, description="cap on training questions (None: all)")
    eval_size: int | None = Field(None, ge=1, description="cap on held-out questions (None: all)")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="held-out share when the source has one split")
    synthetic: SyntheticConfig = SyntheticConfig()
    seed: int = 0


class TaskConfig(Strict):
    kind: Literal["mcq", "numeric", "yesno", "exact", "custom"] = "mcq"
    custom: str | None = Field(None, description="custom task as 'module:function' (needs allow_custom_code)")
    allow_custom_code: bool = False
    system_prompt: str | None = None
    instruction: str | None = Field(None, description="override the task's answer-format instruction")

    @model_validator(mode="after")
    def _custom_needs_name(self) -> "TaskConfig":
        if self.kind == "custom" and not self.custom:
            raise ValueError("task.kind 'custom' needs task.custom: 'module:function'")
        return self


class SamplingConfig(Strict):
    samples: int = Field(4, ge=1, description="samples per question (K)")
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1, description="local generators: sequences per forward pass")
    seed: int = 0
    reasoning: Literal["think", "plain", "drop"] = "think"


class GeneratorConfig(Strict):
    """Where text comes from. Which fields matter depends on ``kind``."""

    kind: Literal["hf", "openai", "vllm", "replay", "scripted"] = "hf"
    model: str | None = Field(None, description="Hub id, local folder, or builtin:smollm2-135m-instruct")
    # openai
    base_url: str | list[str] | None = None
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key")
    endpoint: Literal["chat", "completions"] = "chat"
    max_concurrency: int = Field(8, ge=1)
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    backoff_base: float = Field(1.0, ge=0)
    backoff_max: float = Field(60.0, ge=0)
    stop: list[str] | None = None
    token_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    max_failed_share: float = Field(0.0, ge=0, le=1)
    # replay
    path: str | None = None
    on_missing: Literal["warn", "error"] = Field(
        "warn", description="replay: a question with fewer recorded traces than sampling.samples: warn (store what "
        "there is; the summary counts the missing samples) or error (refuse before storing anything)")
    # scripted
    error_rate: float = Field(0.25, ge=0, le=1)
    # hf / vllm
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1,
        description="vllm: share of GPU memory the engine reserves (lower it when training shares the GPU)",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="vllm: longest prompt plus completion in tokens (None: the model's own limit)"
    )
    sampling: SamplingConfig = SamplingConfig()

    @model_validator(mode="after")
    def _required_fields(self) -> "GeneratorConfig":
        if self.kind in ("hf", "vllm") and not self.model:
            raise ValueError(f"generator kind '{self.kind}' needs 'model' (Hub id or local folder)")
        if self.kind == "openai" and (not self.base_url or not self.model):
            raise ValueError("generator kind 'openai' needs 'base_url' and 'model'")
        if self.kind == "replay" and not self.path:
            raise ValueError("generator kind 'replay' needs 'path' (a JSONL file of recorded traces)")
        return self


class PairsConfig(Strict):
    negatives: Literal["student", "teacher", "both"] = "student"
    filter: Literal["incorrect", "any"] = "incorrect"
    pairing: Literal["capped", "every_positive"] = "capped"
    pairs_per_question: int = Field(2, ge=1)
    no_negative: Literal["drop", "teacher"] = "drop"
    seed: int = 0


class LoraConfig(Strict):
    enabled: bool = False
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
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


PhiSchedule = Literal["constant", "linear"]


class TrainConfig(Strict):
    method: Literal["orpo", "sft"] = "orpo"
    traces: Literal["single", "all"] = Field("all", description="sft: one teacher trace per question, or all positives")
    policy: Literal["off", "on", "mixed"] = "mixed"
    phi: float | list[float] = Field(0.5, description="mixed: refreshed share; a list gives one value per epoch")
    phi_schedule: PhiSchedule = Field("constant", description="constant, or linear ramp from phi_start to phi")
    phi_start: float = Field(0.0, ge=0, le=1)
    when_all_correct: Literal["keep", "teacher"] = Field(
        "keep", description="refreshed question with no wrong student sample: keep old negatives or use teacher's"
    )
    epochs: int = Field(2, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lambda_or: float = Field(0.1, ge=0, alias="lambda", description="weight of the odds-ratio term")
    nll_on_prompt: bool = False
    batch_size: int = Field(8, ge=1, description="pairs per micro-batch")
    token_budget: int | None = Field(
        None, ge=16, description="also cap a micro-batch at this many packed tokens (None: pairs only)"
    )
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    layout: Literal["packed", "plain"] = Field(
        "packed", description="packed: one row per question, prompt shared by its pairs; plain: TRL's layout"
    )
    max_length: int = Field(1024, ge=8, description="prompt + response tokens; longer pairs are truncated")
    lora: LoraConfig = LoraConfig()
    log_every: int = Field(1, ge=1)
    seed: int = 0

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("policy", mode="before")
    @classmethod
    def _policy_from_yaml_bool(cls, v: Any) -> Any:
        """YAML 1.1 (PyYAML) reads an unquoted ``policy: off`` as false and ``on`` as true: take them as meant."""
        if v is False:
            return "off"
        if v is True:
            return "on"
        return v

    @field_validator("phi")
    @classmethod
    def _phi_range(cls, v: float | list[float]) -> float | list[float]:
        for x in v if isinstance(v, list) else [v]:
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"phi must be between 0 and 1, got {x}")
        return v


class EvalConfig(Strict):
    split: Literal["eval", "train"] = "eval"
    max_tokens: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1)
    every_epoch: bool = True
    before_training: bool = True
    self_consistency: int = Field(0, ge=0, description="k samples for self-consistency@k (0: off)")
    temperature: float = Field(0.7, ge=0, description="sampling temperature for self-consistency")


class RunConfig(Strict):
    run_dir: str = "runs/default"
    seed: int = 0
    dataset: DatasetConfig = DatasetConfig()
    task: TaskConfig = TaskConfig()
    teacher: GeneratorConfig = GeneratorConfig(kind="scripted")
    student: GeneratorConfig = GeneratorConfig(kind="hf", model="builtin:smollm2-135m-instruct")
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
                base = {"kind": default.kind, **({"model": default.model} if default.model else {})}
                data[name] = {**base, **section}
        return data

    @model_validator(mode="after")
    def _four_bit_student_weights(self) -> "RunConfig":
        refresh = self.train.method == "orpo" and self.pairs.negatives != "teacher" and self.train.policy != "off"
        if self.train.lora.load_in_4bit and self.student.kind == "vllm" and refresh:
            raise ValueError(
                "train.lora.load_in_4bit with student.kind 'vllm': the refresh copies the student's weights into "
                "the vLLM engine, which cannot take 4-bit weights; use student.kind: hf or train.policy: off")
        return self

    @property
    def path(self) -> Path:
        return Path(self.run_dir)


# ---------------------------------------------------------------------------------------------
# loading


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the config reference in README.md)"
        inp = e.get("input")
        got = "" if e["type"] == "extra_forbidden" or isinstance(inp, dict) else f" (got {inp!r})"
        lines.append(f"  {loc or '<root>'}: {msg}{got}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value).

    The value is read as YAML when it is a number, a boolean, null, a quoted string or a flow list or
    mapping (``0.25``, ``true``, ``[0.1, 0.5]``, ``{question: q}``); anything else is taken literally,
    so ``task.system_prompt=Answer: briefly`` stays a string rather than becoming a mapping, and
    ``task.instruction=Use #tags`` keeps what YAML would drop as a comment.
    """
    if "=" not in text:
        raise UserError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise UserError(f"--set expects key.path=value, got {text!r}")
    path, raw = key.strip().split("."), raw.strip()
    if not raw:
        return path, ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return path, raw
    if raw[0] in "[{\"'" or value is None or isinstance(value, (bool, int, float)):
        return path, value
    return path, raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"--set {text}: '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return data


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice (PyYAML alone silently keeps the last)."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        super().__init__(f"key {key!r} given twice, on line {first_line} and line {second_line}")
        self.key, self.first_line, self.second_line = key, first_line, second_line


def _check_unique_keys(node: yaml.Node, path: str = "") -> None:
    """Raise :class:`DuplicateKeyError` for the first mapping in ``node`` that gives a key twice; the key
    is named by its dotted path (``train.phi``). A key after a merge (``<<: *base``) overrides the
    merged one, as YAML means it to, and is no duplicate."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{path}.{name}" if path and name is not None else name
            if name is not None:
                line = key_node.start_mark.line + 1
                if name in seen:
                    raise DuplicateKeyError(str(dotted), seen[name], line)
                seen[name] = line
            _check_unique_keys(value_node, str(dotted) if dotted is not None else path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]")


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (:class:`DuplicateKeyError`)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {p} is a directory, not a file")
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except DuplicateKeyError as e:
        raise UserError(f"{p}: line {e.second_line}: key {e.key!r} given twice (first on line {e.first_line}); "
                        "YAML would silently keep the second, so remove one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{p}:{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def build_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_errors(e, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " with --set " + " ".join(overrides)
    return build_config(data, source)


def resolved_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data. It holds environment-variable *names*, never key values."""
    return cfg.model_dump(mode="json", by_alias=True)


def save_resolved(cfg: RunConfig, path: str | Path) -> None:
    from .store import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(resolved_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# reference


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")


# Meanings of the fields whose Field() carries no description, keyed by section class and name.
_MEANINGS: dict[tuple[str, str], str] = {
    ("RunConfig", "run_dir"): "the run directory: every stage reads and writes here",
    ("RunConfig", "seed"): "seed for data order, refresh choice, pairing and sampling",
    ("DatasetConfig", "kind"): "synthetic (built in), gsm8k (local files), jsonl (field map), hf (Hub id or saved folder)",
    ("DatasetConfig", "train_split"): "hf/gsm8k: name of the training split",
    ("DatasetConfig", "eval_split"): "hf/gsm8k: name of the held-out split",
    ("DatasetConfig", "seed"): "seed of the synthetic task and of the train/eval split",
    ("SyntheticConfig", "num_choices"): "options per question",
    ("TaskConfig", "kind"): "how answers are extracted and checked",
    ("TaskConfig", "allow_custom_code"): "must be true for task.custom to import user code",
    ("TaskConfig", "system_prompt"): "optional system message before every question",
    ("GeneratorConfig", "kind"): "hf (local transformers), openai (any compatible server), vllm (in-process vLLM engine, optional extra), replay (recorded file), scripted (synthetic teacher)",
    ("GeneratorConfig", "base_url"): "openai: server base URL(s) ending in /v1; a list spreads requests over servers",
    ("GeneratorConfig", "endpoint"): "openai: chat/completions (messages) or completions (plain prompt)",
    ("GeneratorConfig", "max_concurrency"): "openai: requests in flight at once",
    ("GeneratorConfig", "timeout"): "openai: seconds before a request counts as timed out (then retried)",
    ("GeneratorConfig", "max_retries"): "openai: retries per request on 429, 5xx, timeouts, resets, bad JSON",
    ("GeneratorConfig", "backoff_base"): "openai: first backoff in seconds (doubles each retry, with jitter)",
    ("GeneratorConfig", "backoff_max"): "openai: longest single wait, Retry-After included",
    ("GeneratorConfig", "stop"): "openai, vllm: stop sequences",
    ("GeneratorConfig", "token_param"): "openai: the request field that carries sampling.max_tokens; newer OpenAI models want max_completion_tokens. A 400 saying the one sent is unsupported switches to the other for the rest of the run (logged once)",
    ("GeneratorConfig", "max_failed_share"): "teacher: share of the stage's requests that may fail for good (after their retries) before the stage exits with an error; the traces that arrived are kept either way, and rerunning the same command asks only for the missing ones",
    ("GeneratorConfig", "path"): "replay: JSONL of recorded traces ({id, text} per line)",
    ("GeneratorConfig", "error_rate"): "scripted: share of traces with a deliberate mistake (teacher negatives)",
    ("GeneratorConfig", "dtype"): "hf, vllm: weight dtype (hf auto: bf16 on GPU, fp32 on CPU with bf16 autocast; hf float32: plain fp32, no autocast, samples bit-identical at any batch size; vllm auto: vLLM's choice from the checkpoint)",
    ("GeneratorConfig", "device"): "hf: auto, cpu, cuda, cuda:1, ...",
    ("GeneratorConfig", "trust_remote_code"): "hf, vllm: allow model code from the Hub (off unless you set it)",
    ("GeneratorConfig", "tensor_parallel_size"): "vllm: GPUs per engine",
    ("SamplingConfig", "temperature"): "sampling temperature (0: greedy)",
    ("SamplingConfig", "top_p"): "nucleus sampling threshold",
    ("SamplingConfig", "max_tokens"): "longest response in tokens",
    ("SamplingConfig", "seed"): "base of the per-request seeds",
    ("SamplingConfig", "reasoning"): "what the student trains on when the teacher's server sends its reasoning apart (`reasoning_content`, `reasoning`, or `<think>...</think>` in the text): think (default): the reasoning and the answer as `<think>\\n...\\n</think>\\n\\nANSWER`, because the reasoning is what distillation transfers and the tags keep it apart from the answer; plain: the reasoning, a blank line, the answer; drop: the answer only. The answer is always extracted from the answer part (from the reasoning when the answer is empty); a changed choice is a changed store (refused, or --overwrite)",
    ("PairsConfig", "negatives"): "where rejected responses come from: student, teacher or both",
    ("PairsConfig", "filter"): "student negatives: incorrect samples only, or any sample",
    ("PairsConfig", "pairing"): "capped: up to pairs_per_question pairs a question; every_positive: one pair per correct teacher trace (negatives reused when fewer), so the chosen side is exactly what sft-diverse trains on",
    ("PairsConfig", "pairs_per_question"): "capped pairing: pairs per question per epoch (positives cycle, negatives drawn without replacement)",
    ("PairsConfig", "no_negative"): "a question whose negative pool is empty: drop it from the epoch (counted), or pair it with the teacher's wrong traces (still dropped, and counted, when the teacher has none)",
    ("PairsConfig", "seed"): "seed of the pairing",
    ("TrainConfig", "method"): "orpo (preference) or sft (teacher positives only)",
    ("TrainConfig", "policy"): "off (phi 0), on (phi 1) or mixed (phi as given)",
    ("TrainConfig", "epochs"): "training epochs; the refresh runs before each epoch after the first",
    ("TrainConfig", "lr"): "peak learning rate (AdamW)",
    ("TrainConfig", "weight_decay"): "AdamW weight decay",
    ("TrainConfig", "phi_start"): "linear schedule: phi before epoch 2 (ramps to phi before the last epoch)",
    ("TrainConfig", "grad_accum"): "micro-batches per optimizer step",
    ("TrainConfig", "nll_on_prompt"): "also count prompt tokens in the NLL term (what TRL does)",
    ("TrainConfig", "max_grad_norm"): "gradient clipping norm",
    ("TrainConfig", "warmup_ratio"): "share of steps spent warming up the learning rate",
    ("TrainConfig", "scheduler"): "learning-rate decay after warmup",
    ("TrainConfig", "precision"): "auto: bf16 autocast where the GPU or CPU has bf16 units; loss in fp32 always",
    ("TrainConfig", "gradient_checkpointing"): "recompute activations in backward to save memory",
    ("TrainConfig", "log_every"): "log a metrics line every N optimizer steps",
    ("TrainConfig", "seed"): "seed of the data order",
    ("LoraConfig", "enabled"): "train a LoRA adapter (PEFT) instead of all weights",
    ("LoraConfig", "r"): "LoRA rank",
    ("LoraConfig", "alpha"): "LoRA alpha",
    ("LoraConfig", "dropout"): "LoRA dropout",
    ("LoraConfig", "target_modules"): "modules to adapt (PEFT names, or all-linear)",
    ("EvalConfig", "split"): "evaluate on the held-out split (eval) or on the training questions",
    ("EvalConfig", "max_tokens"): "longest response in tokens",
    ("EvalConfig", "batch_size"): "sequences per generation batch",
    ("EvalConfig", "every_epoch"): "evaluate after every epoch, not only the last",
    ("EvalConfig", "before_training"): "evaluate the initial student (epoch 0) in `run`",
}


def config_reference() -> str:
    """The config reference as a markdown table, generated from the models (README.md embeds it)."""
    lines = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(obj: BaseModel, prefix: str) -> None:
        for name, f in type(obj).model_fields.items():
            key = f.alias or name
            value = getattr(obj, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{key}.")
                continue
            shown = "" if value is None else f"`{value}`"
            typ = _type_name(f.annotation).replace("|", "\\|")
            meaning = f.description or _MEANINGS.get((type(obj).__name__, name), "")
            lines.append(f"| `{prefix}{key}` | {typ} | {shown} | {meaning} |")

    walk(RunConfig(), "")
    return "\n".join(lines) + "\n"


def _update_readme(path: Path) -> None:
    import re

    text = path.read_text(encoding="utf-8")
    new = re.sub(
        r"(<!-- config-reference:start -->\n).*?(<!-- config-reference:end -->)",
        lambda m: m.group(1) + config_reference() + m.group(2),
        text,
        flags=re.S,
    )
    path.write_text(new, encoding="utf-8")


if __name__ == "__main__":  # python -m orpo_distill.config [README.md]: refresh the reference table
    import sys

    _update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
