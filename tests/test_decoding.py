"""Our decoding loop (prefill once per prompt, finished rows dropped) against model.generate, in fp32."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LogitsProcessorList

from orpo_distill.generators.base import Request
from orpo_distill.generators.decoding import decode, left_padded, unsupported_reason
from orpo_distill.generators.hf import HFGenerator
from orpo_distill.generators.row_sampling import RowSeededSampler
from orpo_distill.models import load_tokenizer

PROMPTS = ["Count the apples in the big basket on the kitchen table, then say how many are left.", "Hi",
           "What is two plus two?"]
MAX_NEW = 24


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def model(prompt_sensitive_model):
    return prompt_sensitive_model


def encoded(tokenizer) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


def reference(model, tokenizer, prompts, seeds, eos, temperature, top_p=1.0) -> list[list[int]]:
    """model.generate on every row (each prompt repeated for its samples), cut after the first EOS."""
    rows = [p for p, s in zip(prompts, seeds) for _ in s]
    flat = [x for s in seeds for x in s]
    ids, mask = left_padded(rows, tokenizer.pad_token_id)
    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if temperature > 0:
        kwargs["logits_processor"] = LogitsProcessorList(
            [RowSeededSampler(flat, prompt_width=ids.shape[1], temperature=temperature, top_p=top_p)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **kwargs)
    cut = []
    for row in out[:, ids.shape[1]:].tolist():
        end = next((t + 1 for t, tid in enumerate(row) if tid in eos), len(row))
        cut.append(row[:end])
    return cut


def stopping_tokens(model, tokenizer, seeds, temperature, top_p=1.0) -> list[int]:
    """End-of-sequence ids that end the first row by step 5 and the fourth by step 10 (the random model
    rarely writes its real EOS): two tokens those rows write there when nothing stops them."""
    rows = reference(model, tokenizer, encoded(tokenizer), seeds, [tokenizer.eos_token_id], temperature, top_p)
    return [rows[0][4], rows[3][9]]


@pytest.mark.slow
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9), (0.0, 1.0)])
def test_decode_gives_the_tokens_generate_gives(model, tokenizer, temperature, top_p):
    """Three prompts of different lengths with 2, 1 and 3 samples; rows end at different steps."""
    seeds = [[10, 11], [20], [30, 31, 32]]
    eos = stopping_tokens(model, tokenizer, seeds, temperature, top_p)
    got = decode(model, encoded(tokenizer), seeds, pad_id=tokenizer.pad_token_id, eos_ids=eos,
                 max_new_tokens=MAX_NEW, temperature=temperature, top_p=top_p)
    want = reference(model, tokenizer, encoded(tokenizer), seeds, eos, temperature, top_p)
    assert [row for per_prompt in got for row in per_prompt] == want
    lengths = {len(r) for r in want}
    assert len(lengths) > 1 and min(lengths) < MAX_NEW  # some rows did stop early, at different steps
    if temperature > 0:
        assert len({tuple(r) for r in got[2]}) == 3  # the samples of one prompt differ


@pytest.mark.slow
def test_each_prompt_is_prefilled_once_and_ended_rows_leave_the_batch(model, tokenizer):
    eos = stopping_tokens(model, tokenizer, [[1, 2, 3, 4]] * 3, 1.0)
    shapes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        got = decode(model, encoded(tokenizer), [[1, 2, 3, 4]] * 3, pad_id=tokenizer.pad_token_id, eos_ids=eos,
                     max_new_tokens=MAX_NEW, temperature=1.0)
    finally:
        handle.remove()
    assert shapes[0][0] == 3  # the prefill: three prompts, not twelve rows
    rows = [r for per_prompt in got for r in per_prompt]
    # the batch of decoding step t holds exactly the rows that had not ended before it
    for step, (batch, width) in enumerate(shapes[1:], start=1):
        assert width == 1 and batch == sum(1 for r in rows if len(r) > step and r[step - 1] not in eos)
    assert shapes[-1][0] < 12


@pytest.mark.slow
def test_the_generator_gives_the_same_samples_with_either_decoding(model, tokenizer):
    calls = [Request(key=f"q{i}", messages=({"role": "user", "content": PROMPTS[i % 3]},), n=3, temperature=1.0,
                     max_tokens=12, seed=7 * i) for i in range(5)]
    out = {d: HFGenerator.from_model(model, tokenizer, name="hf:tiny", batch_size=4, progress=False, bf16=False,
                                     decoding=d).generate(calls) for d in ("fast", "generate")}
    assert out["fast"] == out["generate"]  # text, token count and finish reason of every sample


def test_a_generation_config_with_a_processor_decodes_with_generate(model, tokenizer, caplog):
    assert unsupported_reason(model) is None
    model.generation_config.repetition_penalty = 1.3
    try:
        assert "repetition_penalty" in unsupported_reason(model)
        g = HFGenerator.from_model(model, tokenizer, name="hf:tiny", batch_size=4, progress=False, bf16=False)
        with caplog.at_level(logging.INFO, logger="orpo_distill.generators.hf"):
            fast = g.generate([Request(key="q", messages=({"role": "user", "content": "Hi"},), max_tokens=6)])
        assert "decoding with model.generate: its generation config sets repetition_penalty" in caplog.text
        plain = HFGenerator.from_model(model, tokenizer, name="hf:tiny", batch_size=4, progress=False, bf16=False,
                                       decoding="generate")
        assert fast == plain.generate([Request(key="q", messages=({"role": "user", "content": "Hi"},), max_tokens=6)])
    finally:
        model.generation_config.repetition_penalty = 1.0
    model.config.layer_types = ["full_attention", "linear_attention"]
    try:
        assert unsupported_reason(model) == "its layers keep linear_attention states"
    finally:
        del model.config.layer_types
    assert unsupported_reason(model) is None
    with pytest.raises(ValueError, match="fast or generate"):
        HFGenerator.from_model(model, tokenizer, name="hf:tiny", decoding="beam")
