"""The report's tables: the comparison (accuracy per variant, what each arm trained on, paired
differences), and a run's evaluations, predicted answers, refreshes and teacher-trace diversity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from .blocks import Block, Heading, Image, Para, Table, fmt_ci, fmt_count, fmt_num, fmt_pct, fmt_pp


def verdict(ci: Sequence[float]) -> str:
    lo, hi = ci
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no clear difference"


def _claim_difference(d: Mapping[str, Any]) -> str:
    name = f"{d['variant']} - {d['reference']}"
    if d.get("ci95") is None:
        return f"{name}: not measured yet"
    return f"{name} {fmt_pp(d['diff'])} ({fmt_pp(d['ci95'][0])} to {fmt_pp(d['ci95'][1])})"


def comparison_blocks(result: Mapping[str, Any]) -> list[Block]:
    """comparison.md: the accuracy table and the paired differences (also the core of report.md)."""
    cfg = result.get("config", {})
    task = f", task `{cfg['task']}`" if cfg.get("task") else ""  # tables written before the task was recorded lack it
    blocks: list[Block] = [
        Heading("Comparison", 1),
        Para(f"Student `{cfg.get('student')}`, teacher `{cfg.get('teacher')}`, dataset `{cfg.get('dataset')}`{task} "
             f"({cfg.get('train_size') or 'all'} training, {cfg.get('eval_size') or 'all'} held-out questions), "
             f"{result['epochs']} epochs, seeds {', '.join(map(str, result['seeds']))}. Accuracy on the "
             f"`{result['split']}` split after the last epoch; the 95% interval is a bootstrap over questions "
             "and seeds."),
        Heading("Accuracy per variant"),
    ]
    header = ["variant", "seeds", "accuracy", "std over seeds", "95% interval", "parse failures",
              "mean length (tokens)", "training (min)", "refresh sampling (min)"]
    rows = []
    base = result.get("base")
    if base:
        same = len(set(base["accuracy_per_seed"])) <= 1  # greedy decoding: one evaluation serves every seed
        rows.append(["base model (epoch 0)", "-" if same else str(len(base["seeds"])), fmt_pct(base["accuracy"]),
                     "-" if same or base["std"] is None else fmt_pp(base["std"]).lstrip("+"), fmt_ci(base["ci95"]),
                     fmt_pct(base["parse_failure_rate"]), fmt_num(base["mean_length"]), "-", "-"])
    for name, v in result["variants"].items():
        rows.append([name, str(len(v["seeds"])), fmt_pct(v["accuracy"]),
                     "n/a (1 seed)" if v["std"] is None else fmt_pp(v["std"]).lstrip("+"), fmt_ci(v["ci95"]),
                     fmt_pct(v["parse_failure_rate"]), fmt_num(v["mean_length"]), fmt_num(v["train_minutes"], 2),
                     fmt_num(v["refresh_sampling_minutes"], 2)])
    blocks.append(Table(header, rows))
    data_rows = [[name, fmt_count(t["questions"]), fmt_count(t["positives"]), fmt_num(t["positive_tokens"], 0),
                  fmt_count(t["rows"]), fmt_count(t["teacher_fallback"]), fmt_count(t.get("nll_only")),
                  fmt_count(t["dropped_no_negative"])]
                 for name, v in result["variants"].items() if (t := v.get("trained_on"))]
    if data_rows:
        blocks += [
            Heading("What each arm trained on"),
            Para("Per epoch, mean over epochs and seeds, from each run's `pairs` events: the questions and the "
                 "distinct positives (correct teacher traces) on the chosen side (SFT: the targets) with their "
                 "student tokens, the rows trained on (pairs, NLL-only rows or SFT examples), questions "
                 "paired through the teacher fallback, questions whose positives trained as NLL-only rows (no "
                 "negative to pair them with; `pairs.no_negative: nll`) and questions left out for want of a "
                 "negative. Arms whose positives match differ only in what the odds-ratio term adds."),
            Table(["variant", "questions", "positives", "positive tokens", "rows", "teacher fallback",
                   "NLL-only", "dropped (no negative)"], data_rows),
        ]
    if result.get("paired"):
        blocks += [
            Heading("Paired differences"),
            Para("Accuracy of the variant minus the reference on the same held-out questions and seeds, with a 95% "
                 "bootstrap interval; \"better\" or \"worse\" only where the interval excludes zero."),
            Table(["variant", "reference", "difference", "95% interval", "seeds x questions", "reading"],
                  [[p["variant"], "base model" if p["reference"] == "base" else p["reference"], fmt_pp(p["diff"]),
                    f"{fmt_pp(p['ci95'][0])} to {fmt_pp(p['ci95'][1])}", f"{p['seeds']} x {p['questions']}",
                    verdict(p["ci95"])] for p in result["paired"]]),
        ]
    if result.get("claims"):
        blocks += [
            Heading("The paper's claims"),
            Para("Each claim needs every difference listed to be positive. Held: every 95% interval above zero; "
                 "not held: some interval below zero; inconclusive: some interval holds zero; incomplete: some "
                 "difference not measured yet (see `orpo_distill.compare.claims`)."),
            Table(["claim", "differences (pp, 95% interval)", "reading"],
                  [[c["claim"], "; ".join(_claim_difference(d) for d in c["differences"]), c["reading"]]
                   for c in result["claims"]]),
        ]
    blocks += _dev_blocks(result)
    odds = [[name, e, fmt_num(m.get("nll"), 3), fmt_num(m.get("or_loss"), 3), fmt_num(m.get("or_loss@end"), 3),
             fmt_pct(m.get("reward_accuracy")), fmt_pct(m.get("reward_accuracy@end")), fmt_num(m.get("log_odds_ratio"), 2),
             fmt_num(m.get("log_odds_ratio@end"), 2), _similarity(m.get("negative_similarity"))]
            for name, v in result["variants"].items() for e, m in (v.get("per_epoch_training") or {}).items()
            if "nll" in m]
    if any("or_loss" in m for v in result["variants"].values() for m in (v.get("per_epoch_training") or {}).values()):
        blocks += [
            Heading("What the odds-ratio term did"),
            Para("Per epoch, from each run's `train` events (mean over the epoch's steps, then over seeds; "
                 "\"end\": the epoch's last quarter of steps). OR loss is -log sigmoid(log odds ratio of chosen "
                 "over rejected); its gradient scales with sigmoid(-log odds ratio), so an OR loss near 0 with "
                 "reward accuracy near 100% means the term has saturated: the pairs are told apart and it "
                 "no longer pushes, leaving the NLL term, as in SFT on the same positives. SFT arms: their NLL only. "
                 "Negatives' similarity: how many words a rejected response shares with its chosen one (difflib's "
                 "ratio on words, 1 the same text; `pairs` events, mean over the runs that logged it), over all "
                 "pairs and per kind of negative (student@E: sampled from the student before epoch E; teacher)."),
            Table(["variant", "epoch", "NLL", "OR loss", "OR loss (end)", "reward accuracy",
                   "reward accuracy (end)", "log odds ratio", "log odds ratio (end)", "negatives' similarity"], odds),
        ]
    computed = [[name, "; ".join(v["computed_with"])] for name, v in result["variants"].items()
                if v.get("computed_with")]
    if computed:
        blocks += [
            Heading("How each arm was computed"),
            Para("From each run's `epoch` events: the precision, the CPU (or device) and the code version "
                 "(package version and git commit) of its training epochs. A comparison resumed across machines "
                 "or code changes can mix these: bf16 results differ at rounding level between CPUs and kernels."),
            Table(["variant", "precision, machine, code"], computed),
        ]
    if result.get("missing"):
        blocks.append(Para("Not finished yet (rerun `orpo-distill compare` to complete): "
                           + ", ".join(f"`{m}`" for m in result["missing"])))
    return blocks


def _dev_blocks(result: Mapping[str, Any]) -> list[Block]:
    """With a dev split (``dataset.dev_size``): each arm's dev accuracy and held-out positives'
    log-probability per epoch, and the test split at each arm's best dev epoch, paired against sft-diverse's."""
    curves = {name: v["per_epoch_dev"] for name, v in result["variants"].items() if v.get("per_epoch_dev")}
    if not curves:
        return []
    base = result.get("base_dev")
    if base and not any("0" in c for c in curves.values()):  # the arms' curves start from it otherwise
        curves = {"base model": {"0": base}, **curves}
    epochs = sorted({int(e) for c in curves.values() for e in c})
    blocks: list[Block] = [
        Heading("Dev accuracy per epoch"),
        Para("Greedy accuracy on the dev split after each epoch (0: the base model), mean over seeds: whether an "
             "arm is still rising, has peaked or overfits. Every choice a person would tune (epochs, learning "
             "rate) is read here, never on the test split."),
        Table(["variant", *[f"epoch {e}" for e in epochs]],
              [[name, *[fmt_pct(c[str(e)]["accuracy"]) if str(e) in c else "" for e in epochs]]
               for name, c in curves.items()]),
        Heading("Held-out positives' log-probability per epoch"),
        Para("Mean over the dev questions' correct teacher traces (never trained on) of the mean token "
             "log-probability the student gives them, l(y) of the ORPO loss, mean over seeds. A preference arm "
             "whose figure falls behind SFT's while both fit their training data shows the likelihood "
             "displacement reported for preference terms."),
        Table(["variant", *[f"epoch {e}" for e in epochs]],
              [[name, *[fmt_num(c[str(e)].get("chosen_logp"), 3) if str(e) in c else "" for e in epochs]]
               for name, c in curves.items()]),
    ]
    best = [[name, ", ".join(f"{e}" for _, e in sorted(v["best_dev"]["epoch_per_seed"].items())),
             fmt_pct(v["best_dev"]["accuracy"]), fmt_ci(v["best_dev"]["ci95"]), fmt_pct(v["accuracy"])]
            for name, v in result["variants"].items() if v.get("best_dev")]
    if best:
        blocks += [
            Heading("At the best dev epoch"),
            Para(f"Each arm's `{result['split']}` accuracy after the epoch with its best dev accuracy (the earliest "
                 "on a tie; per seed), beside its accuracy after the last epoch: what a user who picks the epoch "
                 "count on dev would ship. The paired differences against sft-diverse at its own best dev epoch "
                 "follow."),
            Table(["variant", "best dev epoch (per seed)", "accuracy there", "95% interval", "after the last epoch"],
                  best),
        ]
    if result.get("paired_best_dev"):
        blocks.append(Table(["variant", "reference", "difference", "95% interval", "seeds x questions", "reading"],
                            [[p["variant"], p["reference"] + " (best dev epoch)", fmt_pp(p["diff"]),
                              f"{fmt_pp(p['ci95'][0])} to {fmt_pp(p['ci95'][1])}", f"{p['seeds']} x {p['questions']}",
                              verdict(p["ci95"])] for p in result["paired_best_dev"]]))
    return blocks


def _similarity(kinds: Mapping[str, float] | None) -> str:
    """``0.52`` or ``0.52 (student@1 0.18, student@2 0.86)``: over all pairs, then per kind of negative
    when there are several."""
    if not kinds or "all" not in kinds:
        return "n/a"
    parts = [f"{k} {v:.2f}" for k, v in kinds.items() if k != "all"]
    return f"{kinds['all']:.2f}" + (f" ({', '.join(parts)})" if len(parts) > 1 else "")


def diversity_blocks(div: Mapping[str, Any], image: Path) -> list[Block]:
    return [
        Heading("Teacher traces"),
        Table(["questions", "traces per question", "correct share", "questions with no positive", "distinct-1",
               "distinct-2", "distinct-3", "mean pairwise similarity"],
              [[str(div["questions"]), str(div["k"]), fmt_pct(div["correct_share"]), str(div["correct_histogram"][0]),
                *(fmt_num(div["distinct"][str(n)]["mean"], 3) for n in (1, 2, 3)), fmt_num(div["mean_similarity"], 3)]]),
        Para("Distinct-n: unique n-grams over all n-grams of a question's traces taken together (higher: more "
             "varied wording). Similarity: difflib's ratio on words, averaged over the pairs of traces "
             "(1: identical)."),
        Image(image, "Teacher trace diversity and correctness"),
    ]


def refresh_table(refresh: Mapping[str, Mapping[int, Mapping[str, float]]]) -> Table:
    rows = [[name, str(e), fmt_num(r["phi"], 2), fmt_count(r["selected"]), fmt_count(r["refreshed"]), fmt_count(r["all_correct"]),
             fmt_count(r["fell_back_to_teacher"])]
            for name, per in refresh.items() for e, r in per.items()]
    return Table(["variant", "before epoch", "phi", "selected", "refreshed", "all correct (kept old)",
                  "fell back to teacher"], rows)


def eval_table(evals: Mapping[int, Mapping[str, Any]]) -> Table:
    """One row per evaluated epoch; mcq's text-match figures (evaluation.option_text_agreement) beside
    the accuracy, so a letter accuracy at chance is read next to how often the working was right."""
    header = ["epoch", "questions", "accuracy", "95% interval (Wilson)", "parse failures", "mean length (tokens)"]
    rows = [[str(e), str(v["n"]), fmt_pct(v["accuracy"]), fmt_ci(v["ci95"]), fmt_pct(v["parse_failure_rate"]),
             fmt_num(v["mean_length"])] for e, v in sorted(evals.items())]
    if any(v.get("option_text_match") is not None for v in evals.values()):
        header += ["computes the gold option", "letter = its own working"]
        for row, (_, v) in zip(rows, sorted(evals.items())):
            row += [fmt_pct(v.get("option_text_match")), fmt_pct(v.get("letter_text_agreement"))]
    return Table(header, rows)


_BUCKETS = ("other", "unparsed")


def answer_blocks(evals: Mapping[int, Mapping[str, Any]]) -> list[Block]:
    """Predicted answers per evaluated epoch against the gold (evaluation.answer_distribution).

    Rows are the last evaluation's answers; when its answers are complete (no "other" bucket, as for
    mcq) the answers only earlier evaluations gave are added too. A "-" is an answer that evaluation
    did not keep among its top ones (it is inside that evaluation's "other").
    """
    dist = {e: v for e, v in sorted(evals.items()) if v.get("predicted_answers")}
    if not dist:
        return []
    last = dist[max(dist)]
    complete = "other" not in last["predicted_answers"]
    keys = [k for k in last["predicted_answers"] if k not in _BUCKETS]
    if complete:
        keys += [k for v in dist.values() for k in v["predicted_answers"] if k not in _BUCKETS]
    keys = list(dict.fromkeys(keys)) + [b for b in _BUCKETS if any(b in v["predicted_answers"] for v in dist.values())]

    def cell(counts: Mapping[str, int], k: str, n: int, whole: bool) -> str:
        c = counts.get(k, 0 if whole or k in _BUCKETS else None)  # a bucket is never folded away
        return "-" if c is None else f"{c} ({fmt_pct(c / n if n else math.nan, 0)})"

    gold = last.get("gold_answers") or {}
    rows = [[k, "-" if k == "unparsed" else cell(gold, k, last["n"], complete),
             *(cell(v["predicted_answers"], k, v["n"], "other" not in v["predicted_answers"]) for v in dist.values())]
            for k in keys]
    dash = " \"-\": not among that evaluation's most frequent answers (in its \"other\")." if any(
        "-" in r[2:] for r in rows) else ""
    return [Heading("Predicted answers"),
            Table(["answer", "gold", *(f"epoch {e}" for e in dist)], rows),
            Para("Questions per answer: the gold, and the student's predictions after each evaluated epoch. "
                 "One answer far above its gold share means the accuracy partly measures that share." + dash)]


def cost_blocks(cost: Mapping[str, Mapping[str, float]]) -> list[Block]:
    """What generation cost, per sampling stage: the teacher's token totals are what a hosted API bills."""
    if not cost:
        return []
    rows = [[stage, fmt_count(c["requests"]), fmt_count(c["new_samples"]), fmt_count(c["failed_requests"]),
             fmt_count(c["prompt_tokens"]), fmt_count(c["completion_tokens"]), fmt_count(c["reasoning_tokens"]),
             fmt_num(c["seconds"], 0)] for stage, c in cost.items()]
    return [Heading("Generation cost"),
            Table(["stage", "requests", "new samples", "failed requests", "prompt tokens", "completion tokens",
                   "of which reasoning", "seconds"], rows),
            Para("Token counts as the generator reported them (a server's `usage`; local generators count "
                 "completion tokens only, prompt tokens 0), summed over every invocation of the stage.")]
