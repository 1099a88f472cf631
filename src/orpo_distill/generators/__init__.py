"""Generator backends behind one protocol (see ``base.py``). Each backend is imported only when used,
so that, for example, vLLM is never imported unless a config names it."""

from __future__ import annotations

from typing import Sequence

from ..config import GeneratorConfig
from ..errors import UserError
from ..records import Record
from .base import GenerationStats, Generator, Request, Sample

__all__ = ["GenerationStats", "Generator", "Request", "Sample", "build_generator"]


def build_generator(cfg: GeneratorConfig, records: Sequence[Record] = (), task_kind: str = "mcq", seed: int = 0,
                    progress: bool = True, role: str = "generator") -> Generator:
    """Build the generator a config section names. ``records`` serves the scripted teacher (and lets the
    replay generator check its file against the questions). ``role`` (``teacher`` or ``student``) names the
    config section in error messages, which the generators word as ``generator.FIELD``."""
    try:
        generator = _build(cfg, records, task_kind, seed, progress)
    except UserError as e:
        text = str(e)
        if role == "generator" or not text.startswith("generator."):
            raise
        raise UserError(role + text[len("generator"):]) from None
    if hasattr(generator, "config_section"):  # errors raised later, while generating, name the same section
        generator.config_section = role
    return generator


def _build(cfg: GeneratorConfig, records: Sequence[Record], task_kind: str, seed: int, progress: bool) -> Generator:
    if cfg.kind == "hf":
        from .hf import HFGenerator

        return HFGenerator.from_config(cfg, progress=progress)
    if cfg.kind == "openai":
        from .openai import OpenAIGenerator

        return OpenAIGenerator(cfg)
    if cfg.kind == "replay":
        from .replay import ReplayGenerator

        replay = ReplayGenerator(cfg)
        replay.check_ids(records)
        return replay
    if cfg.kind == "scripted":
        from .scripted import ScriptedTeacher

        return ScriptedTeacher(list(records), error_rate=cfg.error_rate, seed=seed, task_kind=task_kind)
    if cfg.kind == "vllm":
        from .vllm import VLLMGenerator

        return VLLMGenerator.from_config(cfg, progress=progress)
    raise UserError(f"unknown generator kind {cfg.kind!r}")
