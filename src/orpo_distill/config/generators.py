"""Where text comes from: one pydantic model per generator kind, and ``GeneratorConfig``, their union
told apart by ``kind`` (``hf`` when a section names none). Each kind accepts only its own fields, so a
``base_url`` on an ``hf`` student or a ``device`` on an ``openai`` teacher is refused by name.

An older run folder's config.yaml (from when one flat model held every kind's fields) still loads:
a field of another kind that holds the old model's default is dropped (``_drop_other_kinds_defaults``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, model_validator

from .base import Strict

KINDS = ("hf", "openai", "vllm", "replay", "scripted")
KIND_HELP = ("hf (local transformers), openai (any compatible server), vllm (in-process vLLM engine, optional extra), "
             "replay (recorded file), scripted (synthetic teacher)")

# the flat model's defaults (before the union): an older config.yaml holds every one of them in every section
_FLAT_DEFAULTS: dict[str, Any] = {
    "model": None, "base_url": None, "api_key_env": None, "endpoint": "chat", "max_concurrency": 8, "timeout": 120.0,
    "max_retries": 6, "backoff_base": 1.0, "backoff_max": 60.0, "stop": None, "token_param": "max_tokens",
    "max_failed_share": 0.0, "path": None, "on_missing": "warn", "error_rate": 0.25, "dtype": "auto", "device": "auto",
    "trust_remote_code": False, "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "max_model_len": None,
}


class SamplingConfig(Strict):
    samples: int = Field(4, ge=1, description="samples per question (K)")
    temperature: float = Field(0.8, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling threshold")
    max_tokens: int = Field(256, ge=1, description="longest response in tokens")
    batch_size: int = Field(16, ge=1, description="local generators: sequences per forward pass")
    seed: int = Field(0, description="base of the per-request seeds")
    greedy_first: bool = Field(
        False,
        description="each question's first sample is the greedy decode (temperature 0: what the model answers at "
                    "test time), the other samples-1 are sampled: for the student, negatives that hold the errors "
                    "it makes when evaluated, topped up with samples",
    )
    reasoning: Literal["think", "plain", "drop"] = Field(
        "think",
        description="what the student trains on when the teacher's server sends its reasoning apart (`reasoning_content`,"
                    " `reasoning`, or `<think>...</think>` in the text): think (default): the reasoning and the answer as"
                    " `<think>\\n...\\n</think>\\n\\nANSWER`, because the reasoning is what distillation transfers and the "
                    "tags keep it apart from the answer; plain: the reasoning, a blank line, the answer; drop: the answer"
                    " only. The answer is always extracted from the answer part (from the reasoning when the answer is "
                    "empty); a changed choice is a changed store (refused, or --overwrite)",
    )


class _Generator(Strict):
    kind: str = Field(description=KIND_HELP)  # each kind's model narrows it to its own name
    sampling: SamplingConfig = SamplingConfig()
    max_failed_share: float = Field(
        0.0, ge=0, le=1,
        description="teacher: share of the stage's requests that may fail for good (after their retries) before the stage"
                    " exits with an error; the traces that arrived are kept either way, and rerunning the same command "
                    "asks only for the missing ones",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_other_kinds_defaults(cls, data: Any) -> Any:
        """Another kind's field at the flat model's default is what an older config.yaml wrote into every
        section: dropped. One set to anything else stays, and is refused as a field this kind has not."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items()
                if k in cls.model_fields or k not in _FLAT_DEFAULTS or v != _FLAT_DEFAULTS[k]}

    @property
    def source(self) -> str:
        """What the texts come from, as the trace store names it (a model, a file, or ``scripted``)."""
        raise NotImplementedError


class LocalModelConfig(_Generator):
    """A generator that loads the weights itself (``hf``, ``vllm``): the only kinds a student can train as."""

    model: str = Field(description="Hub id, local folder, or builtin:smollm2-135m-instruct")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weight dtype (hf auto: bf16 on GPU, fp32 on CPU with bf16 autocast; hf float32: plain fp32, no "
                    "autocast, samples bit-identical at any batch size; vllm auto: vLLM's choice from the checkpoint)",
    )
    device: str = Field(
        "auto", description="auto, cpu, cuda, cuda:1, ... (vllm: where the student trains; the engine places itself)")
    trust_remote_code: bool = Field(False, description="allow model code from the Hub (off unless you set it)")

    @property
    def source(self) -> str:
        return self.model


class HFGeneratorConfig(LocalModelConfig):
    kind: Literal["hf"] = Field("hf", description=KIND_HELP)


class OpenAIGeneratorConfig(_Generator):
    kind: Literal["openai"] = Field("openai", description=KIND_HELP)
    model: str = Field(description="the model name the server serves")
    base_url: str | list[str] = Field(
        description="server base URL(s) ending in /v1; a list spreads requests over servers")
    api_key_env: str | None = Field(None, description="name of the environment variable holding the API key")
    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="chat/completions (messages) or completions (plain prompt)")
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout: float = Field(120.0, gt=0, description="seconds before a request counts as timed out (then retried)")
    max_retries: int = Field(6, ge=0, description="retries per request on 429, 5xx, timeouts, resets, bad JSON")
    backoff_base: float = Field(1.0, ge=0, description="first backoff in seconds (doubles each retry, with jitter)")
    backoff_max: float = Field(60.0, ge=0, description="longest single wait, Retry-After included")
    stop: list[str] | None = Field(None, description="stop sequences")
    token_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens",
        description="the request field that carries sampling.max_tokens; newer OpenAI models want "
                    "max_completion_tokens. A 400 saying the one sent is unsupported switches to the other for the rest "
                    "of the run (logged once)",
    )

    @property
    def source(self) -> str:
        return self.model


class VLLMGeneratorConfig(LocalModelConfig):
    kind: Literal["vllm"] = Field("vllm", description=KIND_HELP)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1,
        description="share of GPU memory the engine reserves (lower it when training shares the GPU)",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="longest prompt plus completion in tokens (None: the model's own limit)")
    stop: list[str] | None = Field(None, description="stop sequences")


class ReplayGeneratorConfig(_Generator):
    kind: Literal["replay"] = Field("replay", description=KIND_HELP)
    path: str = Field(description="JSONL of recorded traces ({id, text} per line)")
    on_missing: Literal["warn", "error"] = Field(
        "warn", description="a question with fewer recorded traces than sampling.samples: warn (store what there is; "
        "the summary counts the missing samples) or error (refuse before storing anything)")

    @property
    def source(self) -> str:
        return self.path


class ScriptedGeneratorConfig(_Generator):
    kind: Literal["scripted"] = Field("scripted", description=KIND_HELP)
    error_rate: float = Field(0.25, ge=0, le=1, description="share of traces with a deliberate mistake (teacher negatives)")

    @property
    def source(self) -> str:
        return "scripted"


BY_KIND: dict[str, type[_Generator]] = {
    "hf": HFGeneratorConfig, "openai": OpenAIGeneratorConfig, "vllm": VLLMGeneratorConfig,
    "replay": ReplayGeneratorConfig, "scripted": ScriptedGeneratorConfig,
}


def _kind_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("kind", "hf")
    return getattr(value, "kind", None)


GeneratorConfig = Annotated[
    Union[
        Annotated[HFGeneratorConfig, Tag("hf")],
        Annotated[OpenAIGeneratorConfig, Tag("openai")],
        Annotated[VLLMGeneratorConfig, Tag("vllm")],
        Annotated[ReplayGeneratorConfig, Tag("replay")],
        Annotated[ScriptedGeneratorConfig, Tag("scripted")],
    ],
    Discriminator(
        _kind_of, custom_error_type="generator_kind",
        custom_error_message="kind must be one of " + ", ".join(KINDS)),
]
"""Any generator section: the model of its ``kind``."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(GeneratorConfig)


def generator_config(**data: Any) -> Any:
    """The generator config ``data`` describes (``kind`` picks the model; ``hf`` when absent)."""
    return _ADAPTER.validate_python(data)
