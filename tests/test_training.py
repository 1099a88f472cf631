"""The training loop: micro-batches, step counts, the non-finite guard, packed == plain (LoRA: test_lora.py)."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from orpo_distill import forward, training
from orpo_distill.batching import PairGroup
from orpo_distill.config import TrainConfig
from orpo_distill.errors import NonFiniteLossError
from orpo_distill.models import load_model
from orpo_distill.pipeline import Run
from orpo_distill.training import (
    SftExample,
    epoch_order,
    example_size,
    make_optimizer,
    make_scheduler,
    micro_batches,
    steps_per_epoch,
    train_epoch,
)

# A small, fast run: few questions, one pair each, short sequences, fp32 so results are exact.
FAST = {
    "dataset.train_size": 4,
    "dataset.eval_size": 2,
    "student.sampling.max_tokens": 4,
    "pairs.negatives": "teacher",
    "pairs.pairs_per_question": 1,
    "train.epochs": 1,
    "train.batch_size": 2,
    "train.precision": "fp32",
    "train.max_length": 128,
    "eval.max_tokens": 4,
    "eval.every_epoch": False,
    "eval.before_training": False,
}


def group(n_pairs: int, tag: int) -> PairGroup:
    return PairGroup([1, tag], [([tag, i, 2], [tag, i, 3]) for i in range(n_pairs)])


# ---- micro-batches and step counts ----------------------------------------------------------------


def test_micro_batches_fill_up_to_batch_size_pairs_and_keep_groups_whole() -> None:
    sizes = [3, 2, 2, 1, 4, 6, 1, 1, 1, 1, 1]
    groups = [group(n, t) for t, n in enumerate(sizes)]
    order = list(range(len(groups)))
    batches = micro_batches(groups, order, batch_size=4)
    # every group exactly once, whole (the same object with all its pairs), in the given order
    flat = [g for b in batches for g in b]
    assert [id(g) for g in flat] == [id(g) for g in groups]
    assert [len(g.pairs) for g in flat] == sizes
    for b in batches:
        total = sum(example_size(g) for g in b)
        assert total <= 4 or len(b) == 1, "only a group bigger than the batch may exceed it, alone"
    # greedy: a batch is closed only when the next group does not fit
    for b, nxt in zip(batches, batches[1:]):
        assert sum(example_size(g) for g in b) + example_size(nxt[0]) > 4
    assert [[len(g.pairs) for g in b] for b in batches] == [[3], [2, 2], [1], [4], [6], [1, 1, 1, 1], [1]]


def test_micro_batches_follow_the_order_and_count_sft_examples() -> None:
    examples = [SftExample([1], [i]) for i in range(7)]
    order = epoch_order(7, seed=3, epoch=2)
    assert sorted(order) == list(range(7)) and order == epoch_order(7, seed=3, epoch=2)
    assert order != epoch_order(7, seed=3, epoch=3) or order != epoch_order(7, seed=4, epoch=2)
    batches = micro_batches(examples, order, batch_size=3)
    assert [[e.target_ids[0] for e in b] for b in batches] == [order[0:3], order[3:6], order[6:7]]


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(**kw)


def test_steps_per_epoch_plain_counts() -> None:
    assert steps_per_epoch(16, _cfg(batch_size=8)) == 2
    assert steps_per_epoch(17, _cfg(batch_size=8)) == 3
    assert steps_per_epoch(17, _cfg(batch_size=8, grad_accum=2)) == 2
    assert steps_per_epoch(16, _cfg(batch_size=4, grad_accum=1), world_size=2) == 2
    assert steps_per_epoch(1, _cfg(batch_size=8)) == 1


@pytest.mark.parametrize("k, batch_size, grad_accum, world", list(itertools.product([1, 2, 3, 5], [1, 2, 4, 8], [1, 3], [1, 2])))
def test_steps_per_epoch_bounds_the_steps_train_epoch_takes(k: int, batch_size: int, grad_accum: int, world: int) -> None:
    """The schedule is sized with steps_per_epoch; an epoch that takes more steps runs the learning rate
    past the schedule's end (cosine comes back up, linear sits at 0). Groups of K pairs stay together, so
    a batch can hold fewer than batch_size pairs."""
    cfg = _cfg(batch_size=batch_size, grad_accum=grad_accum)
    for questions in (1, 2, 5, 9, 16):
        # a question yields at most K pairs; some yield fewer
        groups = [group(k if q % 3 else max(1, k - 1), q) for q in range(questions)]
        micro = len(micro_batches(groups, epoch_order(len(groups), 0, 1), batch_size))
        worst = math.ceil(micro / (grad_accum * world))  # a step takes grad_accum micro-batches per rank
        bound = steps_per_epoch(questions * k, cfg, world, group_size=k)
        assert worst <= bound, f"{questions} questions: {worst} steps, schedule sized for {bound}"
        if k == 1:
            assert bound == steps_per_epoch(questions, cfg, world)


# ---- the non-finite guard --------------------------------------------------------------------------


def _teacher_traces(run: Run) -> None:
    """One right and one wrong trace per question, written straight into the teacher store, so that every
    question yields exactly one pair whatever the scripted teacher's randomness does."""
    rows = []
    for r in run.train_records:
        gold = run.task.normalize_gold(r)
        wrong = "A" if gold != "A" else "B"
        for i, (letter, ok) in enumerate([(gold, True), (wrong, False)]):
            text = f"Let me work through it. {r.question.split('.')[0]}. So it is option {letter}.\nThe answer is ({letter})."
            rows.append({"id": r.id, "sample": i, "text": text, "answer": letter, "correct": ok, "source": "teacher",
                         "finish_reason": "stop"})
    run.teacher_store().append(rows)


@pytest.fixture
def tiny_epoch(tiny_config: Any, tiny_model_dir: Path) -> dict[str, Any]:
    """The first epoch's tokenized pair groups (one per question) of a small run, and the tiny model."""
    run = Run(tiny_config(**FAST), progress=False)
    _teacher_traces(run)
    d = run.distiller()
    data = d.epoch_data(1)
    examples = d.tokenize(data.rows)
    assert len(examples) == 4 and all(len(g.pairs) == 1 for g in examples)
    model = load_model(str(tiny_model_dir), dtype="float32")
    return {"run": run, "examples": examples, "model": model, "pad": d.tokenizer.pad_token_id}


def _accelerator() -> Any:
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _train(model: Any, examples: list[Any], cfg: TrainConfig, pad: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch(len(examples), cfg))
    train_epoch(model, examples, opt, sched, cfg, 1, pad, _accelerator(), log=rows.append, progress=False)
    return rows


def _state(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.filterwarnings("ignore:.*does not reproduce the model's logits")
def test_nan_loss_raises_before_the_step_and_leaves_weights_unchanged(
    tiny_epoch: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # NaN weights fail the forward pass's head check, which warns once per process: keep that state to this test
    monkeypatch.setattr(forward, "_warned", set())
    model = tiny_epoch["model"]
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")  # every hidden state, hence the loss, becomes NaN
    before = _state(model)
    cfg = _cfg(batch_size=2, precision="fp32", lr=1e-2)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, 2)
    calls = {"step": 0}
    real_step = opt.step

    def counting_step(*a: Any, **kw: Any) -> Any:
        calls["step"] += 1
        return real_step(*a, **kw)

    opt.step = counting_step  # type: ignore[method-assign]
    logged: list[dict[str, Any]] = []
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1: the loss is nan"):
        train_epoch(model, tiny_epoch["examples"], opt, sched, cfg, 1, tiny_epoch["pad"], _accelerator(),
                    log=logged.append, progress=False)
    assert calls["step"] == 0 and logged == []
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) or torch.allclose(v, after[k], equal_nan=True, rtol=0, atol=0), k
    assert all(p.grad is None for p in model.parameters())


def test_infinite_loss_is_refused_too(tiny_epoch: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard reads the loss itself: an inf loss from otherwise finite weights is refused."""
    real = training.orpo_loss_of

    def inf_loss(*args: Any, **kw: Any) -> Any:
        out = real(*args, **kw)
        out.or_loss = out.or_loss + float("inf")
        return out

    monkeypatch.setattr(training, "orpo_loss_of", inf_loss)
    model = tiny_epoch["model"]
    before = _state(model)
    with pytest.raises(NonFiniteLossError, match="the loss is inf"):
        _train(model, tiny_epoch["examples"], _cfg(batch_size=2, precision="fp32", lr=1e-2), tiny_epoch["pad"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_nan_gradient_with_finite_loss_is_refused_before_the_step(tiny_epoch: dict[str, Any]) -> None:
    """A finite loss whose backward yields a NaN gradient: clipping would spread the NaN to every
    gradient and AdamW would write NaN into every weight, then into the checkpoint."""
    model = tiny_epoch["model"]
    handle = model.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * float("nan"))
    before = _state(model)
    try:
        with pytest.raises(NonFiniteLossError, match="gradient"):
            _train(model, tiny_epoch["examples"], _cfg(batch_size=2, precision="fp32", lr=1e-2), tiny_epoch["pad"])
    finally:
        handle.remove()
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# ---- packed == plain ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_packed_and_plain_layouts_give_the_same_steps(tiny_epoch: dict[str, Any]) -> None:
    """Same per-step metrics (fp32, 1e-5) over two optimizer steps: the gradient norms, and the second
    step's numbers, also check that both layouts produced the same gradients."""
    base = tiny_epoch["model"]
    examples = tiny_epoch["examples"][:2]
    runs = {}
    for layout in ("packed", "plain"):
        cfg = _cfg(batch_size=1, precision="fp32", lr=1e-2, layout=layout, warmup_ratio=0.0)
        model = copy.deepcopy(base)
        runs[layout] = (_train(model, examples, cfg, tiny_epoch["pad"]), model)
    packed, plain = runs["packed"][0], runs["plain"][0]
    assert len(packed) == len(plain) == 2
    keys = ["loss", "nll", "or_loss", "logps/chosen", "logps/rejected", "log_odds_ratio", "margin", "grad_norm"]
    for p, q in zip(packed, plain):
        for k in keys:
            assert p[k] == pytest.approx(q[k], abs=1e-5, rel=1e-5), (p["step"], k)
        assert p["reward_accuracy"] == q["reward_accuracy"]
    assert packed[0]["loss"] != pytest.approx(packed[1]["loss"], abs=1e-6), "the first step changed nothing"
    # (the weights themselves are not compared: Adam's first step moves every weight by about lr in the
    # direction of its gradient's sign, so a gradient of 1e-9 on either side of 0 moves a weight by 2 lr)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*does not reproduce the model's logits")
def test_nll_only_rows_give_the_same_step_however_the_micro_batches_fall(tiny_epoch: dict[str, Any]) -> None:
    """Two NLL-only rows (pairs.no_negative: nll) beside two pairs. The odds-ratio term is a mean over the
    step's pairs only, so one micro-batch of all four and four micro-batches of one (two of them with no
    pair at all) take the same step; the logged pair metrics are the two pairs'."""
    base = tiny_epoch["model"]
    examples = [PairGroup(g.prompt_ids, [(c, r if i % 2 == 0 else [])]) for i, g in enumerate(tiny_epoch["examples"])
                for c, r in g.pairs]
    assert [training.or_pairs(e) for e in examples] == [1, 0, 1, 0]
    runs = {}
    for batch_size, accum in ((4, 1), (1, 4)):
        cfg = _cfg(batch_size=batch_size, grad_accum=accum, precision="fp32", lr=1e-2, warmup_ratio=0.0)
        runs[accum] = _train(copy.deepcopy(base), examples, cfg, tiny_epoch["pad"])
    one, four = runs[1][0], runs[4][0]
    for k in ("loss", "nll", "or_loss", "logps/chosen", "logps/rejected", "reward_accuracy", "grad_norm"):
        assert one[k] == pytest.approx(four[k], abs=1e-5, rel=1e-5), k
    # the odds-ratio term is that of the two pairs alone; the NLL that of SFT on all four chosen sides
    fp32 = {"precision": "fp32", "lr": 1e-2, "warmup_ratio": 0.0}
    pairs_only = _train(copy.deepcopy(base), examples[0::2], _cfg(batch_size=2, **fp32), tiny_epoch["pad"])[0]
    sft = _train(copy.deepcopy(base), [SftExample(e.prompt_ids, e.pairs[0][0]) for e in examples],
                 _cfg(method="sft", batch_size=4, **fp32), tiny_epoch["pad"])[0]
    assert one["or_loss"] == pytest.approx(pairs_only["or_loss"], rel=1e-5)
    assert one["nll"] == pytest.approx(sft["nll"], rel=1e-6)
    assert one["nll"] != pytest.approx(pairs_only["nll"], rel=1e-7)


def test_token_budget_closes_micro_batches_and_keeps_groups_whole():
    from orpo_distill.batching import PairGroup
    from orpo_distill.training import example_tokens, micro_batches

    groups = [PairGroup(prompt_ids=[1] * 10, pairs=[([2 + j] * 5, [30 + j] * 5) for j in range(k)]) for k in (1, 2, 1, 3, 1)]
    order = list(range(len(groups)))
    batches = micro_batches(groups, order, batch_size=100, token_budget=40)
    assert [g for b in batches for g in b] == groups  # every group once, in order, never split
    for b in batches:
        assert len(b) == 1 or sum(example_tokens(g) for g in b) <= 40
    assert [len(b) for b in batches] == [1, 1, 1, 1, 1]  # 20, 30, 20, 40, 20 tokens: no two fit
    assert len(micro_batches(groups, order, batch_size=100, token_budget=None)) == 1


def test_last_step_of_an_epoch_averages_only_the_micro_batches_it_has(monkeypatch):
    """3 micro-batches with grad_accum 2: the second step holds one micro-batch and must not be halved."""
    import torch
    from accelerate import Accelerator

    from orpo_distill import training
    from orpo_distill.config import TrainConfig
    from orpo_distill.training import SftExample, train_epoch

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)

    def fake_forward(model, batch, method, cfg, pad_id):
        loss = model.weight.sum() * 1.0  # d loss / d w = 1 for every micro-batch
        return training.MicroBatchOut(loss, None, {"nll": float(loss.detach())}, 1)

    monkeypatch.setattr(training, "_forward", fake_forward)
    cfg = TrainConfig(method="sft", batch_size=1, grad_accum=2, max_grad_norm=1e9, precision="fp32")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    seen = []
    examples = [SftExample([1], [2]) for _ in range(3)]
    train_epoch(model, examples, opt, sched, cfg, 1, 0, Accelerator(cpu=True),
                log=lambda row: seen.append(float(model.weight)), progress=False)
    assert seen == [-1.0, -2.0]  # each step moves w by the mean gradient, 1, whatever its micro-batch count


def test_the_optimizer_is_torchs_fused_adamw_where_it_applies_and_steps_as_the_default_does() -> None:
    """make_optimizer: fused AdamW on plain CPU weights (not under FSDP/ZeRO), the same update as the
    default multi-tensor AdamW to rounding, over a few steps with weight decay."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    b = copy.deepcopy(a)
    cfg = _cfg(lr=1e-2, weight_decay=0.1)
    fused = make_optimizer(a, cfg)
    assert fused.defaults["fused"] is True
    assert not make_optimizer(b, cfg, sharded=True).defaults.get("fused")
    plain = torch.optim.AdamW([p for p in b.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    x = torch.randn(16, 6)
    for _ in range(4):
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*does not reproduce the model's logits")
def test_one_pair_a_row_at_lambda_0_trains_exactly_as_sft_on_the_chosen_sides(tiny_epoch: dict[str, Any]) -> None:
    """train.pairs_per_row: 1 (the control for ORPO's batching): with two pairs a question, every pair gets
    its own row, so an epoch of ORPO at lambda 0 takes the same micro-batches as SFT over the chosen
    sides in the same order, and the same steps (fp32, 1e-5). Grouped (the default), the same rows
    make half as many examples and other steps."""
    from orpo_distill.recipe import tokenize_rows

    d = tiny_epoch["run"].distiller()
    rows = []
    for r in d.epoch_data(1).rows[:2]:  # two questions, two pairs each
        rows += [r, {**r, "chosen": r["rejected"], "rejected": r["chosen"]}]
    grouped = tokenize_rows(d.tokenizer, rows, 128)
    ungrouped = tokenize_rows(d.tokenizer, rows, 128, pairs_per_row=1)
    assert [len(g.pairs) for g in grouped] == [2, 2] and [len(g.pairs) for g in ungrouped] == [1, 1, 1, 1]
    assert [g.pairs[0] for g in ungrouped] == [p for g in grouped for p in g.pairs]  # row order kept
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    sft_examples = tokenize_rows(d.tokenizer, sft_rows, 128)
    assert [e.target_ids for e in sft_examples] == [g.pairs[0][0] for g in ungrouped]

    fp32 = {"precision": "fp32", "lr": 1e-2, "warmup_ratio": 0.0, "batch_size": 2}
    base = tiny_epoch["model"]
    orpo = _train(copy.deepcopy(base), ungrouped, _cfg(lambda_or=0.0, pairs_per_row=1, **fp32), tiny_epoch["pad"])
    sft = _train(copy.deepcopy(base), sft_examples, _cfg(method="sft", **fp32), tiny_epoch["pad"])
    assert len(orpo) == len(sft) == 2
    for o, s in zip(orpo, sft):
        for k in ("loss", "nll", "grad_norm"):
            assert o[k] == pytest.approx(s[k], abs=1e-5, rel=1e-5), (o["step"], k)
    assert orpo[0]["or_loss"] > 0  # the odds-ratio term was computed, only weighted 0
    grouped_run = _train(copy.deepcopy(base), grouped, _cfg(lambda_or=0.0, **fp32), tiny_epoch["pad"])
    assert grouped_run[0]["nll"] != pytest.approx(sft[0]["nll"], rel=1e-6)  # a question's two pairs, not two questions


# ---- chunked micro-batches (train.chunk_tokens) ---------------------------------------------------------


def test_chunks_cut_a_micro_batch_by_tokens_keeping_whole_examples() -> None:
    from orpo_distill.training import chunks, example_tokens

    batch = [group(2, q) for q in range(5)]
    sizes = [example_tokens(e) for e in batch]
    assert chunks(batch, None) == [batch]
    cut = chunks(batch, 2 * max(sizes))
    assert [e for c in cut for e in c] == batch and len(cut) > 1
    assert all(sum(example_tokens(e) for e in c) <= 2 * max(sizes) for c in cut)
    assert chunks(batch, 16) == [[e] for e in batch]  # every example longer than the budget: one chunk each


@pytest.mark.slow
@pytest.mark.parametrize("method", ["orpo", "sft"])
def test_chunked_steps_are_the_whole_micro_batch_steps(tiny_epoch: dict[str, Any], tiny_model_dir: Path,
                                                       method: str) -> None:
    """The same examples, the same optimizer steps: computing each micro-batch in chunks changes only the
    order of floating-point sums (fp32: the losses, metrics and weights agree to 1e-5)."""
    examples = tiny_epoch["examples"]
    if method == "sft":
        from orpo_distill.training import SftExample

        examples = [SftExample(g.prompt_ids, g.pairs[0][0]) for g in examples]
    results = []
    for chunk in (None, 16):
        model = load_model(str(tiny_model_dir), dtype="float32")
        cfg = _cfg(method=method, batch_size=4, precision="fp32", warmup_ratio=0.0, lr=1e-3, chunk_tokens=chunk)
        rows = _train(model, examples, cfg, tiny_epoch["pad"])
        results.append((rows, _state(model)))
    (whole, w_state), (chunked, c_state) = results
    assert len(whole) == len(chunked) == 1  # one step of 4 examples; chunked: 4 forward/backward passes in it
    for k in ("loss", "nll", "or_loss", "reward_accuracy", "grad_norm"):
        if k in whole[0]:
            assert chunked[0][k] == pytest.approx(whole[0][k], rel=1e-5, abs=1e-7), k
    for name, w in w_state.items():
        torch.testing.assert_close(c_state[name], w, rtol=1e-4, atol=1e-5)  # Adam steps of lr 1e-3: 1% of one
    assert any(not torch.equal(w, v) for w, v in zip(w_state.values(), load_model(str(tiny_model_dir), dtype="float32").state_dict().values()))
