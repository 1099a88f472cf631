"""``orpo-distill report``: report.md, a self-contained report.html and plots/*.png.

The argument is either a run directory (``config.yaml`` and ``metrics.jsonl``) or a comparison folder
(``comparison.json``, written by ``orpo-distill compare``). Both reports are built the same way: the
data is gathered from the files on disk into plain values, the plots are drawn from those values
(``plots.py``), and the text is a list of blocks rendered twice, as Markdown (images linked) and as
HTML (images embedded as base64, so the one file can be mailed or attached to an issue).

Also here: the teacher-trace diversity figures (distinct n-grams and mean pairwise similarity among a
question's K traces), since the report is their only user.
"""

from __future__ import annotations

import base64
import difflib
import html
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from .errors import UserError
from .metrics import read_metrics
from .store import atomic_write_text, read_jsonl

# ---- blocks and their two renderings ---------------------------------------------------------------


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path  # relative to the report's folder
    caption: str


Block = Union[Heading, Para, Table, Image]


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block], root: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}\n")
        elif isinstance(b, Para):
            out.append(f"{b.text}\n")
        elif isinstance(b, Table):
            out.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
            out.append("|" + "|".join(" --- " for _ in b.header) + "|")
            out.extend("| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows)
            out.append("")
        elif isinstance(b, Image):
            out.append(f"![{b.caption}]({b.path.as_posix()})\n\n*{b.caption}*\n")
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-style:italic}code{background:#f5f5f5;padding:0 3px}
"""


def _inline_html(text: str) -> str:
    """Escape, then turn the Markdown we write ourselves (`code`, **bold**) into tags."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)


def render_html(blocks: Sequence[Block], root: Path, title: str) -> str:
    """One self-contained page: every image is embedded, nothing is fetched."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode((root / b.path).read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(b.caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{_inline_html(b.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


# ---- number formatting -----------------------------------------------------------------------------


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def _pp(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:+.1f} pp"


def _ci(ci: Sequence[float]) -> str:
    lo, hi = ci
    return "n/a" if not (math.isfinite(lo) and math.isfinite(hi)) else f"{100 * lo:.1f}-{100 * hi:.1f}%"


def _num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _count(x: float | None) -> str:
    """A count: "80", not "80.0"; a mean of counts over seeds or epochs keeps one decimal when it has one."""
    if x is None or not math.isfinite(x):
        return "n/a"
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


# ---- the comparison tables ---------------------------------------------------------------------------


def verdict(ci: Sequence[float]) -> str:
    lo, hi = ci
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no clear difference"


def comparison_blocks(result: Mapping[str, Any]) -> list[Block]:
    """comparison.md: the accuracy table and the paired differences (also the core of report.md)."""
    cfg = result.get("config", {})
    blocks: list[Block] = [
        Heading("Comparison", 1),
        Para(f"Student `{cfg.get('student')}`, teacher `{cfg.get('teacher')}`, dataset `{cfg.get('dataset')}` "
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
        rows.append(["base model (epoch 0)", "-" if same else str(len(base["seeds"])), _pct(base["accuracy"]),
                     "-" if same or base["std"] is None else _pp(base["std"]).lstrip("+"), _ci(base["ci95"]),
                     _pct(base["parse_failure_rate"]), _num(base["mean_length"]), "-", "-"])
    for name, v in result["variants"].items():
        rows.append([name, str(len(v["seeds"])), _pct(v["accuracy"]),
                     "n/a (1 seed)" if v["std"] is None else _pp(v["std"]).lstrip("+"), _ci(v["ci95"]),
                     _pct(v["parse_failure_rate"]), _num(v["mean_length"]), _num(v["train_minutes"], 2),
                     _num(v["refresh_sampling_minutes"], 2)])
    blocks.append(Table(header, rows))
    data_rows = [[name, _count(t["questions"]), _count(t["positives"]), _num(t["positive_tokens"], 0),
                  _count(t["rows"]), _count(t["teacher_fallback"]), _count(t["dropped_no_negative"])]
                 for name, v in result["variants"].items() if (t := v.get("trained_on"))]
    if data_rows:
        blocks += [
            Heading("What each arm trained on"),
            Para("Per epoch, mean over epochs and seeds, from each run's `pairs` events: the questions and the "
                 "distinct positives (correct teacher traces) on the chosen side (SFT: the targets) with their "
                 "student tokens, the rows trained on (pairs or SFT examples), questions paired through the "
                 "teacher fallback and questions left out for want of a negative. Arms whose positives match "
                 "differ only in what the odds-ratio term adds."),
            Table(["variant", "questions", "positives", "positive tokens", "rows", "teacher fallback",
                   "dropped (no negative)"], data_rows),
        ]
    if result.get("paired"):
        blocks += [
            Heading("Paired differences"),
            Para("Accuracy of the variant minus the reference on the same held-out questions and seeds, with a 95% "
                 "bootstrap interval; \"better\" or \"worse\" only where the interval excludes zero."),
            Table(["variant", "reference", "difference", "95% interval", "seeds x questions", "reading"],
                  [[p["variant"], "base model" if p["reference"] == "base" else p["reference"], _pp(p["diff"]),
                    f"{_pp(p['ci95'][0])} to {_pp(p['ci95'][1])}", f"{p['seeds']} x {p['questions']}",
                    verdict(p["ci95"])] for p in result["paired"]]),
        ]
    if result.get("missing"):
        blocks.append(Para("Not finished yet (rerun `orpo-distill compare` to complete): "
                           + ", ".join(f"`{m}`" for m in result["missing"])))
    return blocks


# ---- gathering: training curves and refreshes -------------------------------------------------------


def _last_per(rows: Iterable[Mapping[str, Any]], key: str) -> dict[Any, Mapping[str, Any]]:
    """The last row per value of ``key``: a resumed run logs again what the killed one had logged."""
    out: dict[Any, Mapping[str, Any]] = {}
    for r in rows:
        out[r[key]] = r
    return out


def training_rows(run_dir: Path) -> tuple[list[float], list[Mapping[str, Any]]]:
    """The run's ``train`` lines in step order (one per step) and their position in epochs."""
    events = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = _last_per((e for e in events if e.get("event") == "train"), "step")
    steps = sorted(train.values(), key=lambda r: r["step"])
    epoch_steps = {int(e["epoch"]): int(e["steps"]) for e in _last_per(
        (e for e in events if e.get("event") == "epoch"), "epoch").values()}
    x, start = [], 0
    by_epoch: dict[int, list[Mapping[str, Any]]] = {}
    for r in steps:
        by_epoch.setdefault(int(r["epoch"]), []).append(r)
    for e in sorted(by_epoch):
        rows = by_epoch[e]
        n = epoch_steps.get(e) or max(1, rows[-1]["step"] - start)
        x += [(e - 1) + (r["step"] - start) / n for r in rows]
        start += n
    return x, steps


def training_series(run_dirs: Sequence[Path]) -> dict[str, Any] | None:
    """One variant's curves: the mean over its seeds, step by step (cut to the shortest seed)."""
    per_seed = [training_rows(d) for d in run_dirs]
    per_seed = [(x, r) for x, r in per_seed if r]
    if not per_seed:
        return None
    n = min(len(r) for _, r in per_seed)
    keys = sorted({k for _, rows in per_seed for row in rows for k in row if isinstance(row[k], (int, float))})
    metrics = {}
    for k in keys:
        m = np.array([[float(row.get(k, math.nan)) if isinstance(row.get(k), (int, float)) else math.nan
                       for row in rows[:n]] for _, rows in per_seed])
        with np.errstate(all="ignore"):
            metrics[k] = [float(v) for v in np.nanmean(m, axis=0)] if np.isfinite(m).any() else []
    return {"x": per_seed[0][0][:n], "seeds": len(per_seed), "metrics": metrics}


def refresh_counts(run_dirs: Sequence[Path]) -> dict[int, dict[str, float]]:
    """Mean over seeds of each epoch's refresh event (selected, refreshed, all_correct, phi, ...)."""
    per_epoch: dict[int, list[Mapping[str, Any]]] = {}
    for d in run_dirs:
        events = (e for e in read_metrics(Path(d) / "metrics.jsonl") if e.get("event") == "refresh")
        for e, row in _last_per(events, "epoch").items():
            per_epoch.setdefault(int(e), []).append(row)
    keys = ("selected", "refreshed", "all_correct", "fell_back_to_teacher", "questions", "phi")
    return {e: {k: float(np.mean([float(r.get(k, 0.0)) for r in rows])) for k in keys}
            for e, rows in sorted(per_epoch.items())}


# ---- teacher trace diversity --------------------------------------------------------------------------

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams over all n-grams, pooled over ``texts`` (the K traces of one question): 1.0 when
    no n-gram repeats across or within traces, small when the traces say the same thing."""
    grams = [tuple(ws[i:i + n]) for ws in map(words, texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def mean_pairwise_similarity(texts: Sequence[str]) -> float:
    """Mean difflib ratio (2 x matching words / total words) over all pairs of ``texts``."""
    tokens = [words(t) for t in texts]
    sims = [difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() for a, b in itertools.combinations(tokens, 2)]
    return float(np.mean(sims)) if sims else math.nan


def teacher_diversity(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Per question: distinct-1/2/3 and mean pairwise similarity of its K traces, and how many are
    correct; returned as means and per-question lists for the plots."""
    by_q: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_q.setdefault(str(r["id"]), []).append(r)
    if not by_q:
        return None
    k = max(len(v) for v in by_q.values())
    distinct: dict[str, dict[str, float]] = {}
    for n in (1, 2, 3):
        vals = np.array([distinct_n([t["text"] for t in v], n) for v in by_q.values()])
        vals = vals[np.isfinite(vals)]
        distinct[str(n)] = {"mean": float(vals.mean()) if vals.size else math.nan,
                            "std": float(vals.std()) if vals.size else math.nan}
    sims = [mean_pairwise_similarity([t["text"] for t in v]) for v in by_q.values()]
    ncorrect = [sum(bool(t["correct"]) for t in v) for v in by_q.values()]
    finite = [s for s in sims if math.isfinite(s)]
    return {
        "questions": len(by_q),
        "k": k,
        "distinct": distinct,
        "mean_similarity": float(np.mean(finite)) if finite else math.nan,
        "per_question_similarity": sims,
        "correct_share": sum(ncorrect) / sum(len(v) for v in by_q.values()),
        "correct_histogram": [sum(1 for c in ncorrect if c == j) for j in range(k + 1)],
    }


def _diversity_blocks(div: Mapping[str, Any], image: Path) -> list[Block]:
    return [
        Heading("Teacher traces"),
        Table(["questions", "traces per question", "correct share", "questions with no positive", "distinct-1",
               "distinct-2", "distinct-3", "mean pairwise similarity"],
              [[str(div["questions"]), str(div["k"]), _pct(div["correct_share"]), str(div["correct_histogram"][0]),
                *(_num(div["distinct"][str(n)]["mean"], 3) for n in (1, 2, 3)), _num(div["mean_similarity"], 3)]]),
        Para("Distinct-n: unique n-grams over all n-grams of a question's traces taken together (higher: more "
             "varied wording). Similarity: difflib's ratio on words, averaged over the pairs of traces "
             "(1: identical)."),
        Image(image, "Teacher trace diversity and correctness"),
    ]


# ---- the two reports -----------------------------------------------------------------------------------


def _draw_common(root: Path, series: dict[str, Any], refresh: dict[str, Any], div: Mapping[str, Any] | None,
                 per_epoch: dict[str, Any], label: str, several_seeds: bool) -> dict[str, Path]:
    from . import plots

    out: dict[str, Path] = {}
    if series:
        out["training"] = plots.plot_training_curves(series, root / "plots" / "training_curves.png",
                                                     f"Training curves: {label}")
    if per_epoch and any(len(v) >= 2 for v in per_epoch.values()):
        out["epochs"] = plots.plot_accuracy_per_epoch(per_epoch, root / "plots" / "accuracy_per_epoch.png",
                                                      f"Held-out accuracy per epoch: {label}")
    if refresh:
        out["refresh"] = plots.plot_refresh(refresh, root / "plots" / "refresh.png",
                                            "Mixed-policy refresh: negatives regenerated before each epoch",
                                            "questions (mean over seeds)" if several_seeds else "questions")
    if div:
        out["diversity"] = plots.plot_teacher_diversity(
            div, root / "plots" / "teacher_diversity.png",
            f"Teacher traces: {div['questions']} questions x {div['k']} samples")
    return {k: v.relative_to(root) for k, v in out.items()}


def _refresh_table(refresh: Mapping[str, Mapping[int, Mapping[str, float]]]) -> Table:
    rows = [[name, str(e), _num(r["phi"], 2), _count(r["selected"]), _count(r["refreshed"]), _count(r["all_correct"]),
             _count(r["fell_back_to_teacher"])]
            for name, per in refresh.items() for e, r in per.items()]
    return Table(["variant", "before epoch", "phi", "selected", "refreshed", "all correct (kept old)",
                  "fell back to teacher"], rows)


def comparison_report(root: Path) -> list[Block]:
    from . import plots

    result = json.loads((root / "comparison.json").read_text(encoding="utf-8"))
    variants = list(result["variants"])
    runs = {v: [root / p for p in result["runs"].get(v, {}).values()] for v in variants}
    series = {v: s for v in variants if (s := training_series(runs[v])) is not None}
    # variants that never select a question (off-policy, phi 0) have nothing to show there
    refresh = {v: r for v in variants if (r := refresh_counts(runs[v])) and any(x["selected"] for x in r.values())}
    first_shared = root / result["shared"][str(result["seeds"][0])]
    traces = first_shared / "teacher" / "traces.jsonl"
    div = teacher_diversity(read_jsonl(traces)) if traces.is_file() else None
    per_epoch = {v: {int(e): x for e, x in result["variants"][v].get("per_epoch", {}).items()} for v in variants}
    images = _draw_common(root, series, refresh, div, per_epoch, f"{len(variants)} variants", len(result["seeds"]) > 1)
    if result["variants"]:
        rows = [{"name": v, "accuracy": s["accuracy"], "ci95": s["ci95"], "per_seed": s["accuracy_per_seed"]}
                for v, s in result["variants"].items()]
        images["accuracy"] = plots.plot_accuracy(
            rows, result.get("base"), root / "plots" / "accuracy.png",
            f"Held-out accuracy after {result['epochs']} epochs ({len(result['seeds'])} seed(s))").relative_to(root)
    blocks = [Heading(f"ORPO-Distill comparison report: {root.name}", 1), *comparison_blocks(result)[1:]]
    if "accuracy" in images:
        blocks.append(Image(images["accuracy"], "Accuracy per variant with 95% intervals; dashed: the base model"))
    if "epochs" in images:
        blocks.append(Image(images["epochs"], "Accuracy after each evaluated epoch (mean over seeds)"))
    if "training" in images:
        blocks += [Heading("Training"), Image(images["training"],
                                              "Training curves per variant (faint: raw; solid: moving average)")]
    if refresh:
        blocks += [Heading("Mixed-policy refresh"), _refresh_table(refresh),
                   Image(images["refresh"], "Questions refreshed before each epoch (mean over seeds)")]
    if div:
        blocks += _diversity_blocks(div, images["diversity"])
    return blocks


def _eval_table(evals: Mapping[int, Mapping[str, Any]]) -> Table:
    """One row per evaluated epoch; mcq's text-match figures (evaluation.option_text_agreement) beside
    the accuracy, so a letter accuracy at chance is read next to how often the working was right."""
    header = ["epoch", "questions", "accuracy", "95% interval (Wilson)", "parse failures", "mean length (tokens)"]
    rows = [[str(e), str(v["n"]), _pct(v["accuracy"]), _ci(v["ci95"]), _pct(v["parse_failure_rate"]),
             _num(v["mean_length"])] for e, v in sorted(evals.items())]
    if any(v.get("option_text_match") is not None for v in evals.values()):
        header += ["computes the gold option", "letter = its own working"]
        for row, (_, v) in zip(rows, sorted(evals.items())):
            row += [_pct(v.get("option_text_match")), _pct(v.get("letter_text_agreement"))]
    return Table(header, rows)


_BUCKETS = ("other", "unparsed")


def _answer_blocks(evals: Mapping[int, Mapping[str, Any]]) -> list[Block]:
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
        return "-" if c is None else f"{c} ({_pct(c / n if n else math.nan, 0)})"

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


def run_report(root: Path) -> list[Block]:
    import yaml

    cfg = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
    summary_file = root / "eval" / "summary.json"
    summaries = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
    name = root.name
    series = {name: s} if (s := training_series([root])) is not None else {}
    refresh = {name: r} if (r := refresh_counts([root])) else {}
    traces = root / "teacher" / "traces.jsonl"
    div = teacher_diversity(read_jsonl(traces)) if traces.is_file() else None
    split = cfg.get("eval", {}).get("split", "eval")
    evals = {int(k.rsplit("_", 1)[1]): v for k, v in summaries.items() if k.startswith(f"{split}_epoch_")}
    per_epoch = {name: {e: {"accuracy": v["accuracy"], "ci95": v["ci95"]} for e, v in sorted(evals.items())}}
    per_epoch = per_epoch if evals else {}
    images = _draw_common(root, series, refresh, div, per_epoch, name, False)
    train = cfg.get("train", {})
    blocks: list[Block] = [
        Heading(f"ORPO-Distill run report: {name}", 1),
        Para(f"Student `{cfg.get('student', {}).get('model')}`, method `{train.get('method')}`, negatives "
             f"`{cfg.get('pairs', {}).get('negatives')}`, policy `{train.get('policy')}` (phi {train.get('phi')}), "
             f"{train.get('epochs')} epochs."),
    ]
    if evals:
        blocks += [Heading("Evaluation"), _eval_table(evals),
                   *(Para(f"**Warning (epoch {e}):** {v['warning']}.")
                     for e, v in sorted(evals.items()) if v.get("warning"))]
        if "epochs" in images:
            blocks.append(Image(images["epochs"], "Accuracy after each evaluated epoch (0: before training)"))
        blocks += _answer_blocks(evals)
    epochs = _last_per((e for e in read_metrics(root / "metrics.jsonl") if e.get("event") == "epoch"), "epoch")
    if epochs:
        blocks += [Heading("Training"), Table(
            ["epoch", "steps", "examples", "tokens", "seconds", "tokens/s"],
            [[str(e), str(r["steps"]), str(r["examples"]), str(r["tokens"]), _num(r["seconds"]),
              _num(r["tokens"] / r["seconds"] if r["seconds"] else math.nan, 0)] for e, r in sorted(epochs.items())])]
    if "training" in images:
        blocks.append(Image(images["training"], "Training curves (faint: raw; solid: moving average)"))
    if refresh:
        blocks += [Heading("Mixed-policy refresh"), _refresh_table(refresh),
                   Image(images["refresh"], "Questions refreshed before each epoch")]
    if div:
        blocks += _diversity_blocks(div, images["diversity"])
    return blocks


def detect(path: Path) -> str:
    """``comparison`` or ``run``; a UserError for anything else."""
    path = Path(path)
    if (path / "comparison.json").is_file():
        return "comparison"
    if (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file():
        return "run"
    if not path.exists():
        raise UserError(f"{path} does not exist")
    raise UserError(f"{path} is neither a run directory (config.yaml and metrics.jsonl) nor a comparison "
                    "folder (comparison.json); run `orpo-distill run` or `orpo-distill compare` first")


def write_report(path: Path) -> Path:
    """Write report.md, report.html and plots/*.png into ``path``; returns report.md's path."""
    root = Path(path)
    kind = detect(root)
    blocks = comparison_report(root) if kind == "comparison" else run_report(root)
    title = blocks[0].text if blocks and isinstance(blocks[0], Heading) else "report"
    atomic_write_text(root / "report.md", render_markdown(blocks, root))
    atomic_write_text(root / "report.html", render_html(blocks, root, title))
    return root / "report.md"
