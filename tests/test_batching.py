"""Tokenizing, collating, and the forward pass: plain layout vs references and TRL, packed vs plain."""

from __future__ import annotations

import os
import random
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from orpo_distill.batching import (
    PairGroup,
    TokenizedPair,
    collate_packed,
    collate_plain,
    collate_sft,
    group_pairs,
    tokenize_pair,
    truncate_pair,
)
from orpo_distill.forward import model_forward, pair_logps, pair_logps_packed, sft_logps
from orpo_distill.errors import UserError
from orpo_distill.logprobs import token_logprobs_from_logits
from orpo_distill.losses import log_odds, orpo_loss, sft_loss

VOCAB = 128
PAD = 0


def tiny_model(impl: str = "sdpa", tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        attn_implementation=impl,
    )
    return LlamaForCausalLM(cfg).float().eval()  # eval: no dropout; gradients still flow


def _ids(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))]


def random_groups(seed: int, ks: list[int]) -> list[PairGroup]:
    """Groups of mixed prompt/response lengths; positives are cycled so chosen responses repeat."""
    rng = random.Random(seed)
    groups = []
    for k in ks:
        prompt = _ids(rng, 1, 9)
        positives = [_ids(rng, 1, 8) for _ in range(rng.randint(1, 2))]
        pairs = [(positives[i % len(positives)], _ids(rng, 1, 8)) for i in range(k)]
        groups.append(PairGroup(prompt, pairs))
    return groups


def flatten(groups: list[PairGroup]) -> list[TokenizedPair]:
    return [TokenizedPair(g.prompt_ids, c, r) for g in groups for c, r in g.pairs]


def _loss(sums: dict[str, torch.Tensor], lambda_or: float = 0.3):
    return orpo_loss(
        sums["chosen_logp_sum"],
        sums["chosen_tokens"],
        sums["rejected_logp_sum"],
        sums["rejected_tokens"],
        sums["nll_sum"],
        sums["nll_count"],
        lambda_or=lambda_or,
    )


def _param_grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}


# ---------------------------------------------------------------------------------------------
# tokenizing


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(20)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def test_tokenize_pair_appends_eos_once(tokenizer) -> None:
    pair = tokenize_pair(tokenizer, "w1 w2", "w3 w4", "w5 </s>", max_length=64)
    assert pair == TokenizedPair(prompt_ids=[4, 5], chosen_ids=[6, 7, 1], rejected_ids=[8, 1])


def test_tokenize_pair_truncates_prompt_left_then_responses_right(tokenizer) -> None:
    prompt = " ".join(f"w{i}" for i in range(10))  # ids 3..12
    # prompt 10 tokens, chosen 6 + eos = 7: 17 > 12. The prompt keeps max(12 - 7, min(10, 12 // 2)) = 6
    # tokens (its floor), then the responses get 12 - 6 = 6 tokens.
    pair = tokenize_pair(tokenizer, prompt, "w0 w1 w2 w3 w4 w5", "w9", max_length=12)
    assert pair.prompt_ids == list(range(7, 13))  # the last 6 prompt tokens
    assert pair.chosen_ids == [3, 4, 5, 6, 7, 8]  # cut from the right, eos lost with it
    assert pair.rejected_ids == [12, 1]
    # room for everything: nothing is cut
    whole = tokenize_pair(tokenizer, prompt, "w0", "w1", max_length=12)
    assert whole.prompt_ids == list(range(3, 13)) and whole.chosen_ids == [3, 1]


def test_truncate_pair_keeps_bounds_and_cuts_only_as_needed() -> None:
    rng = random.Random(3)
    for _ in range(300):
        p = TokenizedPair(_ids(rng, 1, 40), _ids(rng, 1, 40), _ids(rng, 1, 40))
        m = rng.randint(8, 60)
        t = truncate_pair(p, m)
        longest = max(len(t.chosen_ids), len(t.rejected_ids))
        assert len(t.prompt_ids) + longest <= m
        assert t.prompt_ids == p.prompt_ids[len(p.prompt_ids) - len(t.prompt_ids) :]  # a suffix
        assert t.chosen_ids == p.chosen_ids[: len(t.chosen_ids)] and t.chosen_ids  # a non-empty prefix
        assert t.rejected_ids == p.rejected_ids[: len(t.rejected_ids)] and t.rejected_ids
        if len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= m:
            assert t == p
        if len(t.chosen_ids) < len(p.chosen_ids) or len(t.rejected_ids) < len(p.rejected_ids):
            # responses are cut only once the prompt is at its floor
            assert len(t.prompt_ids) == min(len(p.prompt_ids), m // 2)
        elif len(t.prompt_ids) < len(p.prompt_ids):
            assert len(t.prompt_ids) + longest == m  # the prompt lost no more than needed


def test_tokenize_pair_user_errors(tokenizer) -> None:
    with pytest.raises(UserError, match="no tokens"):
        tokenize_pair(tokenizer, "", "w1", "w2", max_length=16)
    no_eos = SimpleNamespace(eos_token_id=None)
    with pytest.raises(UserError, match="eos"):
        tokenize_pair(no_eos, "w1", "w1", "w2", max_length=16)


# ---------------------------------------------------------------------------------------------
# plain layout


def test_collate_plain_layout() -> None:
    pairs = [TokenizedPair([5, 6], [7, 8, 9], [10]), TokenizedPair([11], [12], [13, 14])]
    b = collate_plain(pairs, pad_id=PAD, nll_on_prompt=False)
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],  # chosen 0
        [11, 12, 0, 0, 0],  # chosen 1
        [5, 6, 10, 0, 0],  # rejected 0
        [11, 13, 14, 0, 0],  # rejected 1
    ]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert b["labels"].tolist() == [
        [-100, -100, 7, 8, 9],
        [-100, 12, -100, -100, -100],
        [-100, -100, 10, -100, -100],
        [-100, 13, 14, -100, -100],
    ]
    assert b["response_mask"].sum(-1).tolist() == [3, 1, 1, 2]
    assert b["nll_mask"].int().tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0] * 5, [0] * 5]
    b2 = collate_plain(pairs, pad_id=PAD, nll_on_prompt=True)
    # the prompt counts for the NLL (but not its first token), never for the OR term
    assert b2["nll_mask"].int().tolist() == [[0, 1, 1, 1, 1], [0, 1, 0, 0, 0], [0] * 5, [0] * 5]
    assert b2["labels"][0].tolist() == [-100, 6, 7, 8, 9]
    assert torch.equal(b2["response_mask"], b["response_mask"])


def _reference_sums(model: nn.Module, pairs: list[TokenizedPair], nll_on_prompt: bool) -> dict[str, torch.Tensor]:
    """One unpadded sequence at a time, full logits, explicit loops: the definition."""
    out = {k: [] for k in ["chosen_logp_sum", "chosen_tokens", "rejected_logp_sum", "rejected_tokens", "nll_sum", "nll_count"]}
    for p in pairs:
        for side in ("chosen", "rejected"):
            resp = getattr(p, f"{side}_ids")
            ids = torch.tensor([p.prompt_ids + resp])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            per_tok = [logp[t - 1, ids[0, t]] for t in range(1, ids.shape[1])]  # per_tok[t-1] is token t
            n_p = len(p.prompt_ids)
            resp_sum = torch.stack(per_tok[n_p - 1 :]).sum()
            out[f"{side}_logp_sum"].append(resp_sum)
            out[f"{side}_tokens"].append(torch.tensor(float(len(resp))))
            if side == "chosen":
                nll = -torch.stack(per_tok).sum() if nll_on_prompt else -resp_sum
                out["nll_sum"].append(nll)
                out["nll_count"].append(torch.tensor(float(len(per_tok) if nll_on_prompt else len(resp))))
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_pair_logps_matches_unpadded_reference(nll_on_prompt: bool) -> None:
    model = tiny_model(tie=True)
    pairs = flatten(random_groups(1, [1, 2, 2]))
    batch = collate_plain(pairs, PAD, nll_on_prompt)
    kind, *_ = model_forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert kind == "hidden"  # the chunked path, not the full-logits fallback
    got = pair_logps(model, batch, chunk_size=5)
    ref = _reference_sums(model, pairs, nll_on_prompt)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)


class _ScaledLogits(LlamaForCausalLM):
    """A model that transforms logits after its head (like Cohere's logit_scale)."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 0.5
        return out


def test_logit_transform_falls_back_to_full_logits() -> None:
    base = tiny_model()
    model = _ScaledLogits(base.config).float().eval()
    model.load_state_dict(base.state_dict())
    pairs = flatten(random_groups(2, [2]))
    batch = collate_plain(pairs, PAD, False)
    with pytest.warns(UserWarning, match="full logits"):
        got = pair_logps(model, batch)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tok = token_logprobs_from_logits(logits, batch["labels"])
    torch.testing.assert_close(got["chosen_logp_sum"], (tok[:2] * batch["response_mask"][:2]).sum(-1))


def test_model_without_output_head_uses_its_logits() -> None:
    inner = tiny_model()

    class Bare(nn.Module):  # no get_output_embeddings, no logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return SimpleNamespace(logits=self.inner(input_ids, attention_mask=attention_mask).logits)

    pairs = flatten(random_groups(4, [1, 3]))
    batch = collate_plain(pairs, PAD, True)
    torch.testing.assert_close(pair_logps(Bare(), batch)["nll_sum"], pair_logps(inner, batch)["nll_sum"])


def test_sft_matches_transformers_causal_lm_loss() -> None:
    model = tiny_model()
    rng = random.Random(5)
    examples = [(_ids(rng, 1, 6), _ids(rng, 1, 6)) for _ in range(4)]
    batch = collate_sft(examples, PAD)
    logp_sum, token_count = sft_logps(model, batch, chunk_size=3)
    ours = sft_loss(logp_sum, token_count)
    hf = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert ours.item() == pytest.approx(hf.item(), rel=1e-5)
    g_ours, g_hf = _param_grads(model, ours), _param_grads(model, hf)
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_hf[name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# TRL's ORPOTrainer


def _trl_trainer(beta: float):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
        from trl.experimental.utils import DPODataCollatorWithPadding

    class FakeORPOTrainer:
        """The attributes TRL's loss path reads, and TRL's own methods (not copies)."""

        is_encoder_decoder = False
        padding_value = PAD
        aux_loss_enabled = False
        accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
        concatenated_inputs = staticmethod(ORPOTrainer.concatenated_inputs)
        get_batch_logps = staticmethod(ORPOTrainer.get_batch_logps)
        concatenated_forward = ORPOTrainer.concatenated_forward
        odds_ratio_loss = ORPOTrainer.odds_ratio_loss
        get_batch_loss_metrics = ORPOTrainer.get_batch_loss_metrics

    trainer = FakeORPOTrainer()
    trainer.beta = beta
    return trainer, DPODataCollatorWithPadding(pad_token_id=PAD)


def _trl_features(p: TokenizedPair) -> dict[str, list[int]]:
    """What ORPOTrainer.tokenize_row yields: prompt + response rows, labels -100 on the prompt."""
    feats = {"prompt_input_ids": p.prompt_ids, "prompt_attention_mask": [1] * len(p.prompt_ids)}
    for side in ("chosen", "rejected"):
        resp = getattr(p, f"{side}_ids")
        feats[f"{side}_input_ids"] = p.prompt_ids + resp
        feats[f"{side}_attention_mask"] = [1] * (len(p.prompt_ids) + len(resp))
        feats[f"{side}_labels"] = [-100] * len(p.prompt_ids) + resp
    return feats


def test_matches_trl_orpo_trainer() -> None:
    """TRL counts the prompt in the NLL: our nll_on_prompt=True. TRL's beta is our lambda."""
    lambda_or = 0.25
    model = tiny_model()
    pairs = flatten(random_groups(7, [1, 3, 2]))
    trainer, collator = _trl_trainer(lambda_or)
    trl_batch = collator([_trl_features(p) for p in pairs])

    trl_chosen, trl_rejected, _, _, trl_nll = trainer.concatenated_forward(model, trl_batch)
    trl_loss, metrics = trainer.get_batch_loss_metrics(model, trl_batch)

    ours = _loss(pair_logps(model, collate_plain(pairs, PAD, nll_on_prompt=True), chunk_size=7), lambda_or=lambda_or)
    torch.testing.assert_close(ours.logps_chosen, trl_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.logps_rejected, trl_rejected, rtol=1e-5, atol=1e-5)
    assert ours.nll.item() == pytest.approx(trl_nll.item(), abs=1e-5)
    assert ours.nll.item() == pytest.approx(metrics["nll_loss"], abs=1e-5)
    # TRL's metric "log_odds_ratio" is mean(logsigmoid(ratio)) = -L_OR; "log_odds_chosen" is mean(ratio)
    assert ours.or_loss.item() == pytest.approx(-metrics["log_odds_ratio"], abs=1e-5)
    assert ours.log_odds_ratio.mean().item() == pytest.approx(metrics["log_odds_chosen"], abs=1e-5)
    assert ours.reward_accuracy.item() == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)
    assert ours.loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    g_ours, g_trl = _param_grads(model, ours.loss), _param_grads(model, trl_loss)
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_trl[name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# packed layout


def test_collate_packed_layout() -> None:
    group = PairGroup([5, 6, 7], [([8, 9], [10]), ([8, 9], [11, 12])])
    b = collate_packed([group, PairGroup([20], [([21], [22])])], pad_id=PAD, nll_on_prompt=False)
    # the shared chosen response [8, 9] appears once
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 0, 0, 0, 0, 0]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 3, 4]
    assert b["position_ids"][1, :3].tolist() == [0, 1, 1]
    m = b["attention_mask"][0, 0].int()
    assert m.shape == (8, 8)
    assert m[2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # prompt: causal
    assert m[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # chosen's 2nd token: prompt + own past
    assert m[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]  # rejected 1: prompt + itself, not the chosen
    assert m[7].tolist() == [1, 1, 1, 0, 0, 0, 1, 1]  # rejected 2, 2nd token
    pad = b["attention_mask"][1, 0].int()
    assert pad[5].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]  # padding sees only itself
    assert pad[:3, 3:].sum() == 0  # real tokens never see padding
    # targets: each response's first token is predicted by the prompt's last token (flat index 2)
    assert b["target_ids"].tolist() == [8, 9, 10, 11, 12, 21, 22]
    assert b["source_index"].tolist() == [2, 3, 2, 2, 6, 8, 8]
    assert b["pair_chosen"].tolist()[:2] == [1, 1]  # both pairs read the same chosen segment
    assert b["segment_tokens"].tolist() == [2, 2, 1, 2, 0, 1, 1]
    with_prompt = collate_packed([group], pad_id=PAD, nll_on_prompt=True)
    assert with_prompt["target_ids"].tolist()[:2] == [6, 7]  # prompt tokens but the first
    assert with_prompt["source_index"].tolist()[:2] == [0, 1]


def test_group_pairs_groups_by_prompt_in_order() -> None:
    a, b = [1, 2], [3]
    pairs = [TokenizedPair(a, [4], [5]), TokenizedPair(b, [6], [7]), TokenizedPair(a, [8], [9]), TokenizedPair(a, [4], [10])]
    groups = group_pairs(pairs)
    assert [g.prompt_ids for g in groups] == [a, b]
    assert groups[0].pairs == [([4], [5]), ([8], [9]), ([4], [10])]
    assert groups[0].packed_length() == 2 + 5  # [4] counted once
    capped = group_pairs(pairs, max_pairs=2)
    assert [len(g.pairs) for g in capped] == [2, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_equals_plain_loss_and_gradients(impl: str, nll_on_prompt: bool, seed: int) -> None:
    model = tiny_model(impl, tie=seed == 1, seed=seed)
    ks = [1, 2, 3, 4]
    random.Random(seed).shuffle(ks)
    groups = random_groups(10 + seed, ks)
    plain = _loss(pair_logps(model, collate_plain(flatten(groups), PAD, nll_on_prompt), chunk_size=6))
    packed = _loss(pair_logps_packed(model, collate_packed(groups, PAD, nll_on_prompt), chunk_size=6))
    for field in ("loss", "nll", "or_loss", "log_odds_ratio", "logps_chosen", "logps_rejected"):
        torch.testing.assert_close(getattr(packed, field), getattr(plain, field), rtol=1e-5, atol=1e-5, msg=field)
    g_plain, g_packed = _param_grads(model, plain.loss), _param_grads(model, packed.loss)
    for name in g_plain:
        torch.testing.assert_close(g_packed[name], g_plain[name], rtol=1e-5, atol=1e-5, msg=name)


def test_nll_only_rows_in_either_layout() -> None:
    """A row with no rejected side (pairs.no_negative: nll) takes no response slot in the packed row and no
    odds-ratio part in either layout; with it, packed and plain still give the same loss and gradients, and
    that loss is the pairs' odds-ratio term plus the NLL over every chosen token."""
    group = PairGroup([5, 6, 7], [([8, 9], [10]), ([11], [])])
    packed_batch = collate_packed([group], pad_id=PAD, nll_on_prompt=False)
    assert packed_batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]  # no empty segment
    assert packed_batch["row_spans"] == ((3, (2, 1, 1)),)
    assert packed_batch["has_rejected"].tolist() == [True, False]
    plain_batch = collate_plain(flatten([group]), PAD, False)
    assert plain_batch["has_rejected"].tolist() == [True, False]
    assert not plain_batch["response_mask"][3].any()  # the NLL-only row's rejected row has no response

    model = tiny_model("sdpa", seed=2)
    groups = random_groups(7, [2, 3, 1])
    groups[0].pairs[1] = (groups[0].pairs[1][0], [])
    groups[2].pairs[0] = (groups[2].pairs[0][0], [])  # a group with no pair at all
    losses = {}
    for name, sums in (("plain", pair_logps(model, collate_plain(flatten(groups), PAD, True), chunk_size=6)),
                       ("packed", pair_logps_packed(model, collate_packed(groups, PAD, True), chunk_size=6))):
        out = orpo_loss(sums["chosen_logp_sum"], sums["chosen_tokens"], sums["rejected_logp_sum"],
                        sums["rejected_tokens"], sums["nll_sum"], sums["nll_count"], 0.3,
                        has_rejected=sums["has_rejected"])
        assert out.log_odds_ratio.shape == (4,)
        keep = sums["has_rejected"]
        expect_or = -torch.nn.functional.logsigmoid(
            log_odds(sums["chosen_logp_sum"][keep] / sums["chosen_tokens"][keep])
            - log_odds(sums["rejected_logp_sum"][keep] / sums["rejected_tokens"][keep])).mean()
        torch.testing.assert_close(out.or_loss, expect_or)
        torch.testing.assert_close(out.nll, sums["nll_sum"].sum() / sums["nll_count"].sum())
        losses[name] = out
    for field in ("loss", "nll", "or_loss", "log_odds_ratio"):
        torch.testing.assert_close(getattr(losses["packed"], field), getattr(losses["plain"], field),
                                   rtol=1e-5, atol=1e-5, msg=field)
    g_plain, g_packed = _param_grads(model, losses["plain"].loss), _param_grads(model, losses["packed"].loss)
    for name in g_plain:
        torch.testing.assert_close(g_packed[name], g_plain[name], rtol=1e-5, atol=1e-5, msg=name)


def test_tokenize_pair_without_a_rejected_side(tokenizer) -> None:
    p = tokenize_pair(tokenizer, "w1 w2", "w3", None, max_length=16)
    assert p.rejected_ids == [] and not p.has_rejected and p.chosen_ids[-1] == tokenizer.eos_token_id


def test_packed_mask_matters() -> None:
    """Guard against a vacuous equality: a plain causal mask over the packed row gives other numbers
    (the dense-mask path; the segmented one reads ``row_spans``, guarded below)."""
    model = tiny_model("sdpa")
    groups = random_groups(3, [3])
    batch = collate_packed(groups, PAD, False)
    right = pair_logps_packed(model, batch, segmented=False)["rejected_logp_sum"]
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"]).tril()
    wrong = pair_logps_packed(model, batch, segmented=False)["rejected_logp_sum"]
    assert not torch.allclose(right, wrong, atol=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_segmented_attention_is_taken_and_equals_the_dense_mask(monkeypatch: pytest.MonkeyPatch,
                                                                checkpointing: bool) -> None:
    """The packed batch's SDPA attention runs by segments (once per layer and forward), gives the dense
    mask's values and gradients, and leaves transformers' registry as it was. Under gradient
    checkpointing the backward's recomputation (outside the context) takes the dense mask: same result."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from orpo_distill import segmented_attention as seg

    model = tiny_model("sdpa", seed=2)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()
    groups = random_groups(21, [3, 1, 4])
    batch = collate_packed(groups, PAD, nll_on_prompt=True)
    calls: list[int] = []
    real = seg.segmented_sdpa
    monkeypatch.setattr(seg, "segmented_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = _loss(pair_logps_packed(model, batch))
    taken = 0 if checkpointing else model.config.num_hidden_layers  # checkpointing: the dense mask throughout
    assert len(calls) == taken
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    dense = _loss(pair_logps_packed(model, batch, segmented=False))
    assert len(calls) == taken  # the dense path never went by segments
    for field in ("loss", "nll", "or_loss", "logps_chosen", "logps_rejected"):
        torch.testing.assert_close(getattr(fast, field), getattr(dense, field), rtol=1e-5, atol=1e-5, msg=field)
    g_fast, g_dense = _param_grads(model, fast.loss), _param_grads(model, dense.loss)
    for name in g_dense:
        torch.testing.assert_close(g_fast[name], g_dense[name], rtol=1e-5, atol=1e-5, msg=name)
    if checkpointing:
        return
    # and the spans are what it reads: the prompt/response boundary moved by one, other numbers
    right = pair_logps_packed(model, batch)["rejected_logp_sum"]
    batch["row_spans"] = tuple((p - 1, (r[0] + 1, *r[1:])) for p, r in batch["row_spans"])
    assert not torch.allclose(pair_logps_packed(model, batch)["rejected_logp_sum"], right, atol=1e-4)


def test_packed_refuses_attention_without_dense_masks() -> None:
    model = tiny_model("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="sdpa"):
        pair_logps_packed(model, collate_packed(random_groups(0, [1]), PAD, False))


def test_a_sharded_output_head_falls_back_to_the_models_own_logits(tiny_model_dir) -> None:
    """Under DeepSpeed ZeRO-3 a rank's head weight is an empty placeholder marked with ds_id (FSDP2: a
    DTensor): applying it outside the model's forward would fail, so the full logits path is taken,
    and gives the same log-probs."""
    from orpo_distill.forward import model_forward
    from orpo_distill.models import load_model

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    kind, hidden, head, bias = model_forward(model, input_ids=ids, attention_mask=mask)
    assert kind == "hidden"
    expected = torch.nn.functional.linear(hidden, head, bias)
    model.get_output_embeddings().weight.ds_id = 7  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    try:
        kind, logits, head, _ = model_forward(model, input_ids=ids, attention_mask=mask)
    finally:
        del model.get_output_embeddings().weight.ds_id
    assert kind == "logits" and head is None
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_segmented_attention_leaves_what_it_does_not_cover_to_the_dense_mask() -> None:
    """A keyword that changes attention (sinks, soft-capping, a sliding window, attention weights), dropout,
    or a call of another shape: transformers' own SDPA with the dense mask."""
    from types import SimpleNamespace

    from orpo_distill import segmented_attention as seg

    q = torch.zeros(1, 4, 9, 8)
    plain = SimpleNamespace()
    with seg.segmented_attention(((3, (2, 4)),), 9):
        assert seg._covers(plain, q, 0.0, {"position_ids": q, "use_cache": False, "sliding_window": None})
        assert seg._covers(plain, q, 0.1, {}) is None
        assert seg._covers(plain, q, 0.0, {"s_aux": torch.zeros(4)}) is None
        assert seg._covers(plain, q, 0.0, {"softcap": 30.0}) is None
        assert seg._covers(plain, q, 0.0, {"output_attentions": True}) is None
        assert seg._covers(SimpleNamespace(sliding_window=4), q, 0.0, {}) is None
        assert seg._covers(plain, torch.zeros(1, 4, 8, 8), 0.0, {}) is None  # another width
    assert seg._covers(plain, q, 0.0, {}) is None  # outside the context


@pytest.mark.parametrize("rows, width", [
    (((5, (3, 1, 4)), (2, ()), (7, (6,))), 14),  # prompts of three lengths, a row without responses, padding
    (((4, (2, 3)), (3, (1, 5))), 9),  # every row filled to the width: no padding
])
@pytest.mark.parametrize("native_gqa", [True, False])
def test_segmented_sdpa_equals_sdpa_with_the_packed_mask(rows, width, native_gqa, monkeypatch) -> None:
    """Every row at once, grouped keys (2 key heads for 6 query heads, taken as they are or repeated as on
    CUDA): the same outputs and gradients as SDPA over the dense mask ``collate_packed`` builds (prompt
    causal, each response to the prompt and itself causally, padding to itself), in [B, T, H, D]."""
    from orpo_distill import segmented_attention as seg

    monkeypatch.setattr(seg, "_native_gqa", lambda t: native_gqa)

    torch.manual_seed(0)
    q = torch.randn(len(rows), 6, width, 8, requires_grad=True)
    k = torch.randn(len(rows), 2, width, 8, requires_grad=True)
    v = torch.randn(len(rows), 2, width, 8, requires_grad=True)
    mask = torch.zeros(len(rows), 1, width, width, dtype=torch.bool)
    for b, (prompt, responses) in enumerate(rows):
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask[b, 0, :prompt, :prompt] = causal[:prompt, :prompt]
        start = prompt
        for r in responses:
            mask[b, 0, start:start + r, :prompt] = True
            mask[b, 0, start:start + r, start:start + r] = causal[:r, :r]
            start += r
        mask[b, 0, range(start, width), range(start, width)] = True  # padding: itself
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=mask).transpose(1, 2)
    fast = seg.segmented_sdpa(q, k, v, rows)
    assert fast.shape == (len(rows), width, 6, 8)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(dense)
    g_dense = torch.autograd.grad((dense * weights).sum(), (q, k, v))
    g_fast = torch.autograd.grad((fast * weights).sum(), (q, k, v))
    for name, a, b in zip("qkv", g_fast, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    # in another dtype: the inputs cast in the layout copy, the output in that dtype
    assert seg.segmented_sdpa(q.double(), k.double(), v.double(), rows).dtype == torch.float64
    assert seg.segmented_sdpa(q, k, v, rows, dtype=torch.float64).dtype == torch.float64
    for empty in ((0, (2,)), (3, (2, 0))):
        with pytest.raises(ValueError, match="empty prompt or response"):
            seg.segmented_sdpa(q, k, v, (empty,) + tuple(rows[1:]))


# ---- train.pad_multiple: rounded widths, the same sums ----------------------------------------------


def test_rounded_widths_pad_only_and_leave_every_sum_unchanged() -> None:
    from orpo_distill.batching import padded_width

    assert [padded_width(w, 64) for w in (1, 64, 65, 130)] == [64, 64, 128, 192] and padded_width(37, 1) == 37
    model = tiny_model()
    groups = random_groups(5, [2, 3, 1])
    pairs = flatten(groups)
    with torch.no_grad():
        for collate, forward, arg in ((collate_packed, pair_logps_packed, groups), (collate_plain, pair_logps, pairs)):
            plain, rounded = collate(arg, PAD, False), collate(arg, PAD, False, pad_multiple=64)
            assert rounded["input_ids"].shape[-1] % 64 == 0 and rounded["input_ids"].shape[-1] > plain["input_ids"].shape[-1]
            a, b = forward(model, plain), forward(model, rounded)
            for k in ("chosen_logp_sum", "rejected_logp_sum", "nll_sum", "chosen_tokens", "rejected_tokens"):
                assert torch.allclose(a[k], b[k], atol=1e-5), k
        examples = [(p.prompt_ids, p.chosen_ids) for p in pairs]
        s1, s2 = sft_logps(model, collate_sft(examples, PAD)), sft_logps(model, collate_sft(examples, PAD, pad_multiple=64))
        assert torch.allclose(s1[0], s2[0], atol=1e-5) and torch.equal(s1[1], s2[1])
