"""Local transformers generation on the tiny Llama: request order, left padding, EOS, stats."""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from orpo_distill.config import generator_config
from orpo_distill.generators import build_generator
from orpo_distill.generators import hf as hf_module
from orpo_distill.generators.base import Generator, Request
from orpo_distill.generators.hf import HFGenerator
from orpo_distill.models import load_tokenizer

PROMPTS = [  # deliberately not in length order
    "Count the apples in the big basket on the kitchen table, then tell me how many are left after Tom eats three.",
    "Hi",
    "What is two plus two?",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def model(prompt_sensitive_model):
    return prompt_sensitive_model


@pytest.fixture
def fp32(monkeypatch):
    """Greedy equality across batch shapes is exact only without bf16 autocast, whose rounding can
    depend on the batch shape; what these tests check is padding and ordering, not bf16 kernels."""
    monkeypatch.setattr(hf_module, "autocast", lambda device, enabled=True: nullcontext())


def req(i: int, n: int = 1, max_tokens: int = 8, **kw) -> Request:
    return Request(key=f"q{i}", messages=({"role": "user", "content": PROMPTS[i]},), n=n, max_tokens=max_tokens, **kw)


def gen(model, tokenizer, batch_size: int, decoding: str = "fast") -> HFGenerator:
    return HFGenerator.from_model(model, tokenizer, name="hf:tiny", batch_size=batch_size, progress=False,
                                  decoding=decoding)


def test_from_config_builds_a_generator(tiny_model_dir):
    g = build_generator(generator_config(kind="hf", model=str(tiny_model_dir), device="cpu"))
    assert isinstance(g, HFGenerator) and isinstance(g, Generator)
    assert g.name == f"hf:{tiny_model_dir}" and g.batch_size == 16


def test_samples_come_back_per_request_in_request_order(model, tokenizer, fp32):
    one = gen(model, tokenizer, batch_size=1)
    refs = [one.generate([req(i)])[0][0].text for i in range(len(PROMPTS))]
    assert len(set(refs)) == len(refs), "the prompts must have different continuations for this test to mean anything"
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert lengths != sorted(lengths)

    # 6 rows in batches of 4: the length sort puts rows of different requests side by side
    out = gen(model, tokenizer, batch_size=4).generate([req(0, n=2), req(1, n=3), req(2, n=1)])
    assert [len(s) for s in out] == [2, 3, 1]
    assert [[s.text for s in samples] for samples in out] == [[refs[0]] * 2, [refs[1]] * 3, [refs[2]]]


def test_greedy_batched_equals_unbatched(model, tokenizer, fp32):
    """Left padding must not change what a prompt generates: the batched greedy output of each prompt
    equals its greedy output alone (no padding at all), token for token."""
    one = gen(model, tokenizer, batch_size=1)
    alone = [one.generate([req(i, max_tokens=12)])[0][0] for i in range(len(PROMPTS))]
    batched = gen(model, tokenizer, batch_size=8).generate([req(i, max_tokens=12) for i in range(len(PROMPTS))])
    assert [s[0].text for s in batched] == [s.text for s in alone]
    assert [s[0].num_tokens for s in batched] == [s.num_tokens for s in alone]
    again = gen(model, tokenizer, batch_size=8).generate([req(i, max_tokens=12) for i in range(len(PROMPTS))])
    assert [s[0].text for s in again] == [s[0].text for s in batched]  # deterministic


def test_mixed_settings_in_one_call(model, tokenizer, fp32):
    """Greedy and sampled requests in one call are batched apart; the greedy ones are unaffected and
    sampling with a seed repeats."""
    ref = gen(model, tokenizer, 1).generate([req(2)])[0][0].text
    call = [req(0, n=2, temperature=1.0, seed=7), req(2), req(1, n=2, temperature=1.0, seed=7)]
    first = gen(model, tokenizer, batch_size=8).generate(call)
    second = gen(model, tokenizer, batch_size=8).generate(call)
    assert first[1][0].text == ref
    assert [[s.text for s in x] for x in first] == [[s.text for s in x] for x in second]
    assert first[0][0].text != first[0][1].text  # two samples of one request differ


@pytest.mark.parametrize("decoding", ["fast", "generate"])
def test_stops_at_eos_and_counts_tokens(model, tokenizer, fp32, decoding):
    """Make the model emit EOS as its third token in the first row only: that sample stops there
    (finish_reason "stop", EOS counted, not in the text), the other runs to max_tokens."""
    eos = tokenizer.eos_token_id
    calls = {"n": 0}

    def force_eos(module, inputs, logits):
        calls["n"] += 1
        if calls["n"] == 3:  # prefill gives token 1, the next step token 2, then EOS
            logits = logits.clone()
            logits[0, -1, eos] = 1e4
            return logits
        return None

    g = gen(model, tokenizer, batch_size=4, decoding=decoding)
    handle = model.get_output_embeddings().register_forward_hook(force_eos)
    try:
        (samples,) = g.generate([req(1, n=2, max_tokens=8)])
    finally:
        handle.remove()
    stopped = [s for s in samples if s.finish_reason == "stop"]
    ran = [s for s in samples if s.finish_reason == "length"]
    assert len(stopped) == 1 and len(ran) == 1
    assert stopped[0].num_tokens == 3 and ran[0].num_tokens == 8
    assert tokenizer.eos_token not in stopped[0].text
    assert ran[0].text.startswith(stopped[0].text) and stopped[0].text
    assert (g.stats.requests, g.stats.samples, g.stats.completion_tokens) == (1, 2, 11)

    g.generate([req(0, max_tokens=5), req(2, n=2, max_tokens=5)])
    assert (g.stats.requests, g.stats.samples, g.stats.completion_tokens) == (3, 5, 26)
    assert g.stats.seconds > 0


def test_training_mode_is_restored(model, tokenizer):
    model.train()
    try:
        gen(model, tokenizer, 2).generate([req(1, max_tokens=2)])
        assert model.training
    finally:
        model.eval()


def _texts(out) -> list[list[str]]:
    return [[s.text for s in samples] for samples in out]


@pytest.mark.slow
def test_sampled_traces_do_not_depend_on_batch_size_or_batch_company(model, tokenizer, fp32):
    """Issue 12: a sample is a function of (seed, question, sample index, weights). Batch 1, 5 and 64 give
    the same texts; so does a request asked alone, or among others in another order."""
    calls = [Request(key=f"q{i}", messages=req(i % 3).messages, n=4, temperature=1.0, max_tokens=10, seed=100 + i)
             for i in range(6)]
    by_batch = {b: _texts(gen(model, tokenizer, batch_size=b).generate(calls)) for b in (1, 5, 64)}
    assert by_batch[1] == by_batch[5] == by_batch[64]
    alone = _texts(gen(model, tokenizer, batch_size=5).generate([calls[3]]))[0]
    reordered = _texts(gen(model, tokenizer, batch_size=5).generate(calls[::-1]))[::-1]
    assert alone == by_batch[5][3] and reordered == by_batch[5]
    # the K samples of one question differ (the tiny model is not degenerate at temperature 1)
    for samples in by_batch[1]:
        assert len(set(samples)) == len(samples)
    # a top_p < 1 batch keeps the same property
    nucleus = [Request(key=c.key, messages=c.messages, n=2, temperature=0.9, top_p=0.8, max_tokens=10, seed=c.seed)
               for c in calls]
    assert _texts(gen(model, tokenizer, 1).generate(nucleus)) == _texts(gen(model, tokenizer, 64).generate(nucleus))


def test_a_resumed_request_continues_the_same_samples(model, tokenizer, fp32):
    """Asking for samples 1..3 of a question after sample 0 was stored (a resume: the store asks with the
    seed of the first missing sample) gives what one request for all four gives."""
    whole = gen(model, tokenizer, 8).generate([req(0, n=4, temperature=1.0, seed=40)])[0]
    head = gen(model, tokenizer, 8).generate([req(0, n=1, temperature=1.0, seed=40)])[0]
    tail = gen(model, tokenizer, 8).generate([req(0, n=3, temperature=1.0, seed=41)])[0]
    assert [s.text for s in head + tail] == [s.text for s in whole]
    assert [s.num_tokens for s in head + tail] == [s.num_tokens for s in whole]
