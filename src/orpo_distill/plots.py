"""The report's plots, drawn with matplotlib's object API on the Agg canvas.

Why no pyplot: it keeps global state (a current figure, a backend chosen at first import) that a
library should not touch; ``Figure`` plus ``savefig`` needs neither a display nor a backend switch.
Each function takes plain data (lists and dicts, prepared by the ``report`` package) and writes one PNG.
Readability rules kept everywhere: a title, axis labels with units, a legend when there are several
series, constrained layout so labels never overlap, long tick labels rotated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

DPI = 110
BASE_COLOR = "0.35"

# (metric key in metrics.jsonl, panel title, y label with unit)
TRAINING_PANELS: list[tuple[str, str, str]] = [
    ("nll", "NLL of the chosen response", "nats per token"),
    ("or_loss", "Odds-ratio loss", "nats"),
    ("log_odds_ratio", "Log odds ratio (chosen vs rejected)", "nats"),
    ("logps/chosen", "Mean log-prob of chosen", "nats per token"),
    ("logps/rejected", "Mean log-prob of rejected", "nats per token"),
    ("reward_accuracy", "Reward accuracy", "share of pairs (0-1)"),
]


def colors_for(names: Sequence[str]) -> dict[str, Any]:
    """One stable color per variant, the same in every plot of a report."""
    cmap = colormaps["tab10"]
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """A centred-at-the-end moving average that ignores NaNs and keeps the length (short windows at the
    start rather than a shifted curve)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or v.size == 0:
        return v
    ok = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(0, idx - window)
    count = ccount[idx] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (csum[idx] - csum[lo]) / np.maximum(count, 1), np.nan)


def smoothing_window(n: int) -> int:
    return max(1, min(25, n // 8))


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _rotate_if_long(ax: Any, labels: Sequence[str]) -> None:
    if labels and (max(len(s) for s in labels) > 8 or len(labels) > 4):
        for t in ax.get_xticklabels():
            t.set_rotation(25)
            t.set_horizontalalignment("right")


def plot_training_curves(series: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> Path:
    """A grid of panels, one per logged quantity; one color per variant on shared axes.

    ``series[name] = {"x": [...], "seeds": n, "metrics": {key: [...]}}`` with ``x`` in epochs (training
    progress). The raw values are drawn faint, a moving average solid.
    """
    colors = colors_for(list(series))
    raw_alpha = 0.22 if len(series) <= 3 else 0.12
    fig = _new_figure(15, 8.5)
    axes = fig.subplots(2, 3, sharex=True)
    for ax, (key, panel_title, unit) in zip(axes.flat, TRAINING_PANELS):
        drawn = 0
        for name, s in series.items():
            y = np.asarray(s["metrics"].get(key, []), dtype=float)
            x = np.asarray(s["x"], dtype=float)[: y.size]
            if y.size == 0 or not np.isfinite(y).any():
                continue
            ax.plot(x, y, color=colors[name], alpha=raw_alpha, linewidth=0.8)
            ax.plot(x, moving_average(y, smoothing_window(y.size)), color=colors[name], linewidth=1.8)
            drawn += 1
        for boundary in range(1, int(max((max(s["x"], default=0) for s in series.values()), default=0) + 0.999)):
            ax.axvline(boundary, color="0.6", linestyle=":", linewidth=1)  # epoch ends: where refreshes happen
        ax.set_title(panel_title)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        if key == "reward_accuracy":
            ax.set_ylim(-0.03, 1.03)
        if not drawn:
            ax.text(0.5, 0.5, "not logged by these variants\n(SFT logs NLL only)", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
    for ax in axes[-1]:
        ax.set_xlabel("training progress (epochs)")
    handles = [Line2D([], [], color=colors[n], linewidth=2,
                      label=f"{n} (mean of {s['seeds']} seeds)" if s.get("seeds", 1) > 1 else n)
               for n, s in series.items()]
    handles.append(Line2D([], [], color="0.5", alpha=0.3, linewidth=1, label="raw (per logged step)"))
    handles.append(Line2D([], [], color="0.6", linestyle=":", linewidth=1, label="end of an epoch"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)), frameon=False)
    fig.suptitle(title, fontsize=14)
    return _save(fig, path)


def plot_accuracy(rows: Sequence[Mapping[str, Any]], base: Mapping[str, Any] | None, path: Path, title: str) -> Path:
    """Accuracy per variant: the mean with its 95% interval, each seed as a dot, the base model as a
    band. ``rows``: ``{"name", "accuracy", "ci95", "per_seed"}`` with shares in 0-1."""
    names = [r["name"] for r in rows]
    colors = colors_for(names)
    fig = _new_figure(max(6.5, 1.25 * len(rows) + 3), 5.2)
    ax = fig.subplots()
    if base is not None and math.isfinite(base["accuracy"]):
        lo, hi = base["ci95"]
        ax.axhspan(100 * lo, 100 * hi, color=BASE_COLOR, alpha=0.12, label="base model 95% interval")
        ax.axhline(100 * base["accuracy"], color=BASE_COLOR, linestyle="--", linewidth=1.3,
                   label=f"base model (epoch 0): {100 * base['accuracy']:.1f}%")
    for i, r in enumerate(rows):
        acc, (lo, hi) = r["accuracy"], r["ci95"]
        ax.errorbar([i], [100 * acc], yerr=[[100 * (acc - lo)], [100 * (hi - acc)]], fmt="o", markersize=8,
                    color=colors[r["name"]], capsize=6, linewidth=2)
        seeds = r.get("per_seed") or []
        if len(seeds) > 1:
            ax.scatter(i + np.linspace(-0.12, 0.12, len(seeds)), [100 * a for a in seeds], s=14, color="0.2",
                       zorder=3, label="one seed" if i == 0 else None)
        ax.annotate(f"{100 * acc:.1f}%", (i, 100 * hi), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=9)
    ax.set_xticks(range(len(rows)), names)
    _rotate_if_long(ax, names)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_xlabel("variant (error bars: 95% bootstrap interval over questions and seeds)")
    ax.grid(axis="y", alpha=0.3)
    top = max([100 * r["ci95"][1] for r in rows] + ([100 * base["ci95"][1]] if base else []) + [1.0])
    ax.set_ylim(0, min(100, top * 1.15 + 2))
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(handles)), frameon=False, fontsize=9)
    ax.set_title(title)
    return _save(fig, path)


def plot_accuracy_per_epoch(curves: Mapping[str, Mapping[int, Mapping[str, Any]]], path: Path, title: str) -> Path:
    """Accuracy after each evaluated epoch (0 = before training) per variant, with 95% intervals."""
    colors = colors_for(list(curves))
    fig = _new_figure(9.5, 5.2)
    ax = fig.subplots()
    n = max(len(curves), 1)
    epochs_seen: set[int] = set()
    for i, (name, per_epoch) in enumerate(curves.items()):
        es = sorted(per_epoch)
        epochs_seen.update(es)
        shift = (i - (n - 1) / 2) * 0.03  # a small dodge so the error bars of equal points do not hide each other
        acc = np.array([100 * per_epoch[e]["accuracy"] for e in es])
        lo = np.array([100 * per_epoch[e]["ci95"][0] for e in es])
        hi = np.array([100 * per_epoch[e]["ci95"][1] for e in es])
        ax.errorbar(np.array(es) + shift, acc, yerr=[acc - lo, hi - acc], marker="o", capsize=4,
                    color=colors[name], label=name, linewidth=1.8)
    ax.set_xticks(sorted(epochs_seen))
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("held-out accuracy (%)")
    tops = [100 * x["ci95"][1] for per in curves.values() for x in per.values() if math.isfinite(x["ci95"][1])]
    ax.set_ylim(0, min(100, max(tops + [1.0]) * 1.15 + 2))
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=9, frameon=False,
               title="variant\n(error bars: 95% interval)", title_fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_value_per_epoch(curves: Mapping[str, Mapping[int, float]], path: Path, title: str, ylabel: str) -> Path:
    """One figure per epoch (0 = before training) per variant, as lines."""
    colors = colors_for(list(curves))
    fig = _new_figure(9.5, 5.2)
    ax = fig.subplots()
    for name, per_epoch in curves.items():
        es = sorted(per_epoch)
        ax.plot(es, [per_epoch[e] for e in es], marker="o", color=colors[name], label=name, linewidth=1.8)
    ax.set_xticks(sorted({e for c in curves.values() for e in c}))
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=9, frameon=False)
    ax.set_title(title)
    return _save(fig, path)


REFRESH_BARS = [
    ("selected", "selected for refresh (phi x questions)"),
    ("refreshed", "got new student negatives"),
    ("all_correct", "student got every sample right"),
]


def plot_refresh(per_variant: Mapping[str, Mapping[int, Mapping[str, float]]], path: Path, title: str,
                 ylabel: str = "questions (mean over seeds)") -> Path:
    """Per refresh epoch and variant: questions selected, refreshed, and already solved by the student."""
    names = list(per_variant)
    fig = _new_figure(max(6.0, 4.6 * len(names)), 4.8)
    axes = np.atleast_1d(fig.subplots(1, len(names), sharey=True, squeeze=False)[0])
    cmap = colormaps["Set2"]
    width = 0.8 / len(REFRESH_BARS)
    for ax, name in zip(axes, names):
        epochs = sorted(per_variant[name])
        for j, (key, label) in enumerate(REFRESH_BARS):
            vals = [per_variant[name][e].get(key, 0.0) for e in epochs]
            pos = np.arange(len(epochs)) + (j - (len(REFRESH_BARS) - 1) / 2) * width
            bars = ax.bar(pos, vals, width, color=cmap(j), label=label)
            ax.bar_label(bars, fmt="%.3g", fontsize=8, padding=1)
        total = max((per_variant[name][e].get("questions", 0.0) for e in epochs), default=0.0)
        if total:
            ax.axhline(total, color="0.4", linestyle=":", linewidth=1, label="questions in the buffer")
        phis = " -> ".join(dict.fromkeys(f"{per_variant[name][e].get('phi', float('nan')):.2g}" for e in epochs))
        ax.set_xticks(range(len(epochs)), [f"before epoch {e}" for e in epochs])
        ax.set_title(f"{name} (phi {phis})")
        ax.set_xlabel("refresh")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False, fontsize=9)
    fig.suptitle(title)
    return _save(fig, path)


def plot_teacher_diversity(div: Mapping[str, Any], path: Path, title: str) -> Path:
    """Three panels: distinct-n within a question's K traces; the traces' mean pairwise similarity per
    question; and how many of the K traces are correct."""
    fig = _new_figure(15, 4.8)
    a, b, c = fig.subplots(1, 3)
    ns = [1, 2, 3]
    means = [div["distinct"][str(n)]["mean"] for n in ns]
    stds = [div["distinct"][str(n)]["std"] for n in ns]
    bars = a.bar([f"distinct-{n}" for n in ns], means, yerr=stds, capsize=6, color=colormaps["Set2"](0))
    a.bar_label(bars, fmt="%.2f", padding=3, fontsize=9)
    a.set_ylim(0, 1.1)
    a.set_ylabel("unique n-grams / all n-grams")
    a.set_title(f"Distinct n-grams in a question's {div['k']} traces")
    a.grid(axis="y", alpha=0.3)

    sims = [s for s in div["per_question_similarity"] if math.isfinite(s)]
    b.hist(sims, bins=np.linspace(0, 1, 21), color=colormaps["Set2"](1), edgecolor="white")
    if sims:
        b.axvline(float(np.mean(sims)), color="0.2", linestyle="--", label=f"mean {np.mean(sims):.2f}")
        b.legend(fontsize=9)
    b.set_xlim(0, 1)
    b.set_xlabel("mean pairwise similarity of the traces (difflib ratio on words, 0-1)")
    b.set_ylabel("questions")
    b.yaxis.set_major_locator(MaxNLocator(integer=True))
    b.set_title("How alike the traces of a question are")
    b.grid(axis="y", alpha=0.3)

    counts = div["correct_histogram"]
    ks = list(range(len(counts)))
    bars = c.bar(ks, counts, color=colormaps["Set2"](2))
    c.bar_label(bars, padding=2, fontsize=9)
    c.set_xticks(ks)
    c.set_xlabel(f"correct traces out of {div['k']}")
    c.set_ylabel("questions")
    c.yaxis.set_major_locator(MaxNLocator(integer=True))
    c.set_title(f"Correct share {100 * div['correct_share']:.1f}%; without a positive: {counts[0] if counts else 0}")
    c.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)
