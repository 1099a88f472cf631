"""The trainable student in and out: loaded for training (full, LoRA or QLoRA; from the base model or a
checkpoint) and exported as a plain ``from_pretrained`` folder with the settings it was trained with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .checkpoints import without_tied_copies
from .config import RunConfig
from .layout import RunLayout
from .model_card import write_model_card
from .models import load_model, require_4bit_support
from .provenance import training_settings
from .store import settings_hash
from .training import apply_lora


def load_trainable_student(cfg: RunConfig, checkpoint: Path | None) -> Any:
    """The student to train, in fp32 (QLoRA: a frozen 4-bit base): the base model with a fresh adapter
    when LoRA is on, or the weights (adapter) of ``checkpoint`` to resume from."""
    scfg, tcfg = cfg.local_student, cfg.train
    if tcfg.lora.enabled:
        if tcfg.lora.load_in_4bit:  # QLoRA: a frozen 4-bit base, prepared for k-bit training
            from peft import prepare_model_for_kbit_training

            require_4bit_support(scfg.device)
            model = load_model(scfg.model, trust_remote_code=scfg.trust_remote_code, device=scfg.device,
                               quantization="4bit")
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tcfg.gradient_checkpointing)
        else:
            model = load_model(scfg.model, dtype="float32", trust_remote_code=scfg.trust_remote_code,
                               device=scfg.device)
        if checkpoint is None:
            return _checkpointing(apply_lora(model, tcfg.lora), tcfg.gradient_checkpointing)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
        return _checkpointing(model, tcfg.gradient_checkpointing)
    name = str(checkpoint) if checkpoint is not None else scfg.model
    model = load_model(name, dtype="float32", trust_remote_code=scfg.trust_remote_code, device=scfg.device)
    return _checkpointing(model, tcfg.gradient_checkpointing)


def _checkpointing(model: Any, enabled: bool) -> Any:
    """Gradient checkpointing where the config asks for it (LoRA included: large students need it)."""
    if enabled:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # so checkpointed blocks see a grad path with frozen embeddings
        model.config.use_cache = False
    return model


def export_student(model: Any, tokenizer: Any, cfg: RunConfig, layout: RunLayout,
                   state_dict: dict[str, Any] | None = None) -> Path:
    """``model/``: the distilled student as a plain checkpoint (LoRA merged) for ``from_pretrained``, with
    ``training_settings.json`` and a model card (``README.md``, ``model_card.py``; the final evaluation comes after
    the export and ``Run.run_all`` rewrites it then); a LoRA run also keeps its adapter alone in ``model/adapter/``.
    Written into a temp folder and renamed, so ``model/`` is complete or absent. ``state_dict``: the full weights gathered
    from a sharded model (FSDP, ZeRO-3)."""
    lora = cfg.train.lora
    target = layout.model
    tmp = target.with_name(".model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora.enabled:
        model.save_pretrained(tmp / "adapter")  # before the merge, which removes the adapter's layers
        model = _merged_from_4bit(cfg, tmp / "adapter") if lora.load_in_4bit else model.merge_and_unload()
        state_dict = None  # the gathered state is the adapter's; the merged model has its own
    state_dict = without_tied_copies(model, state_dict)
    model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(tmp)
    settings = training_settings(cfg)
    (tmp / layout.model_settings.name).write_text(
        json.dumps({"settings_hash": settings_hash(settings), "settings": settings}, indent=2), encoding="utf-8")
    write_model_card(tmp, cfg, layout)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _merged_from_4bit(cfg: RunConfig, adapter: Path) -> Any:
    """A 4-bit base cannot take the adapter into full-precision weights: reload the base on the CPU in
    the student's dtype (bf16 for ``auto``, QLoRA's compute dtype), load the adapter and merge."""
    from peft import PeftModel

    scfg = cfg.student
    base = load_model(scfg.model, dtype="bfloat16" if scfg.dtype == "auto" else scfg.dtype,
                      trust_remote_code=scfg.trust_remote_code, device="cpu")
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
