"""A run's files in the Hugging Face tools people already use: ``pairs/epoch_1.jsonl`` through ``datasets``
into TRL's ORPOTrainer, and the exported ``model/`` through ``transformers.pipeline``. Needs TRL (the dev
extra); a tiny run made here."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_config_dict

FAST = {
    "dataset.train_size": 4,
    "dataset.eval_size": 2,
    "student.sampling.max_tokens": 4,
    "student.sampling.samples": 2,
    "pairs.pairs_per_question": 2,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.lr": 1e-3,
    "train.max_length": 128,
    "eval.max_tokens": 4,
    "eval.every_epoch": False,
    "eval.before_training": False,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    import orpo_distill as od

    cfg = od.load_config(tiny_config_dict(tmp_path_factory.mktemp("trl") / "run", tiny_model_dir), overrides=FAST)
    od.run(cfg, progress=False)
    return Path(cfg.run_dir)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations inside TRL's config
def test_trl_orpo_trainer_trains_on_a_runs_pairs(run_dir: Path, tmp_path: Path) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    pairs = load_dataset("json", data_files=str(run_dir / "pairs" / "epoch_1.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names) and len(pairs) >= 2
    # TRL's conversational preference format: the prompt's messages, then one assistant message each side
    row = pairs[0]
    assert row["prompt"][-1]["role"] == "user"
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"

    model_dir = run_dir / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                      beta=0.1, max_length=128, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                      disable_tqdm=True, seed=0)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok)
    result = trainer.train()

    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result.training_loss)
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())  # it trained


def test_exported_model_generates_through_a_transformers_pipeline(run_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model_dir = run_dir / "model"
    generator = pipeline("text-generation", model=str(model_dir), device="cpu")
    messages = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples?"}]
    out = generator(messages, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    chat = out[0]["generated_text"]
    assert chat[:-1] == messages and chat[-1]["role"] == "assistant" and isinstance(chat[-1]["content"], str)

    # the same tokens as the exported weights give by hand: the pipeline read model/, chat template and all
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ref = model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert ref.shape[0] == 5
    tokens = generator(messages, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_tensors=True)
    assert tokens[0]["generated_token_ids"][-5:] == ref.tolist()
