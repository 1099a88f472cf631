"""``orpo-distill report``: every plot is drawn from a finished comparison and from a run directory, the
HTML report carries its images inside, and the diversity figures mean what they say."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from orpo_distill import cli, report
from orpo_distill.compare import run_comparison, run_dir
from orpo_distill.errors import UserError
from orpo_distill.report import Heading, Para, Table, distinct_n, mean_pairwise_similarity, teacher_diversity

FAST = {
    "dataset.train_size": 4,
    "dataset.eval_size": 4,
    "student.sampling.max_tokens": 6,
    "student.sampling.samples": 2,
    "pairs.pairs_per_question": 1,
    "train.epochs": 2,
    "train.batch_size": 2,  # two logged steps an epoch, so the curves have a shape
    "train.lr": 1e-3,
    "train.precision": "fp32",
    "train.max_length": 128,
    "eval.max_tokens": 6,
    "eval.every_epoch": True,  # an evaluation after epoch 1 too: the per-epoch plot
}
COMPARISON_PLOTS = ["accuracy", "accuracy_per_epoch", "training_curves", "refresh", "teacher_diversity"]
PNG = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG"
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"
    pixels = imread(path)
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 500
    assert pixels.std() > 0.05, f"{path} is (nearly) blank"


def check_report(root: Path, names: list[str]) -> str:
    md = (root / "report.md").read_text(encoding="utf-8")
    page = (root / "report.html").read_text(encoding="utf-8")
    for name in names:
        png = root / "plots" / f"{name}.png"
        check_png(png)
        assert f"(plots/{name}.png)" in md
        assert base64.b64encode(png.read_bytes()).decode("ascii") in page, f"{name}.png is not embedded"
    assert not re.search(r"""(src|href)=['"](?!data:)""", page), "report.html refers to a file or URL"
    return md


@pytest.mark.slow
def test_report_renders_every_plot_of_a_finished_comparison(tiny_config: Any, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    run_comparison(tiny_config(**FAST), ["sft-single", "orpo-mixed"], [0], out, progress=False, log=lambda _: None)
    # compare wrote the report; remove it to see `orpo-distill report` write it again, alone
    for p in [out / "report.md", out / "report.html", *(out / "plots").glob("*.png")]:
        p.unlink()
    assert cli.main(["report", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out

    md = check_report(out, COMPARISON_PLOTS)
    assert sorted(p.stem for p in (out / "plots").glob("*.png")) == sorted(COMPARISON_PLOTS)
    for heading in ("## Accuracy per variant", "## Paired differences", "## Training", "## Mixed-policy refresh",
                    "## Teacher traces", "## What the odds-ratio term did"):
        assert heading in md
    result = json.loads((out / "comparison.json").read_text())
    # the odds-ratio table: per epoch for the ORPO arm, the NLL only for the SFT arm
    orpo, sft = (result["variants"][v]["per_epoch_training"] for v in ("orpo-mixed", "sft-single"))
    assert sorted(orpo) == sorted(sft) == ["1", "2"]
    assert {"nll", "or_loss", "reward_accuracy", "log_odds_ratio", "or_loss@end"} <= set(orpo["2"])
    assert "or_loss" not in sft["1"] and sft["1"]["nll"] > 0
    assert f"| orpo-mixed | 2 | {orpo['2']['nll']:.3f} | {orpo['2']['or_loss']:.3f} |" in md
    assert f"| sft-single | 1 | {sft['1']['nll']:.3f} | n/a |" in md
    assert f"| orpo-mixed | 1 | {100 * result['variants']['orpo-mixed']['accuracy']:.1f}%" in md
    assert "| orpo-mixed | 2 | 0.50 | 2 | " in md  # the refresh before epoch 2: round(0.5 * 4) questions, a count
    # how close the negatives were: per epoch, over all pairs and per kind (epoch 2 mixes the initial
    # negatives, student@1, with the refreshed ones, student@2); the SFT arm has none
    sim = {e: orpo[e]["negative_similarity"] for e in ("1", "2")}
    assert set(sim["1"]) == {"all", "student@1"} and set(sim["2"]) == {"all", "student@1", "student@2"}
    assert all(0.0 <= v <= 1.0 for kinds in sim.values() for v in kinds.values())
    assert "negative_similarity" not in sft["1"]
    both = f"{sim['2']['all']:.2f} (student@1 {sim['2']['student@1']:.2f}, student@2 {sim['2']['student@2']:.2f})"
    assert f"| {orpo['2']['log_odds_ratio@end']:.2f} | {both} |" in md

    # a run directory of the same comparison gets its own report (no accuracy-per-variant plot)
    one = run_dir(out, "orpo-mixed", 0)
    assert report.detect(one) == "run"
    report.write_report(one)
    md = check_report(one, ["accuracy_per_epoch", "training_curves", "refresh", "teacher_diversity"])
    assert "## Evaluation" in md and "| 0 | 4 |" in md and "| 2 | 4 |" in md


def test_latest_events_keep_the_last_line_per_key_of_one_event(tmp_path: Path) -> None:
    """A resumed run logs an epoch again: the later line stands; other events and keys are ignored."""
    from orpo_distill.metrics import MetricsLog, latest_events, read_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log("epoch", epoch=1, seconds=5.0)
    log.log("train", epoch=1, step=1)
    log.log("epoch", epoch=1, seconds=7.0)  # after a resume
    log.log("epoch", epoch=2, seconds=3.0)
    got = latest_events(read_metrics(tmp_path / "metrics.jsonl"), "epoch", "epoch")
    assert sorted(got) == [1, 2]
    assert [got[1]["seconds"], got[2]["seconds"]] == [7.0, 3.0]
    assert latest_events([], "epoch", "epoch") == {}


def test_training_curves_follow_epoch_progress_and_skip_duplicates(tmp_path: Path) -> None:
    """A resumed run logs the steps of the killed epoch again; the curve keeps one point per step."""
    lines = [
        {"event": "train", "epoch": 1, "step": 1, "nll": 3.0}, {"event": "train", "epoch": 1, "step": 2, "nll": 2.0},
        {"event": "epoch", "epoch": 1, "steps": 2, "seconds": 1.0},
        {"event": "train", "epoch": 2, "step": 3, "nll": 9.0},  # killed here
        {"event": "resume", "epoch": 1},
        {"event": "train", "epoch": 2, "step": 3, "nll": 1.5}, {"event": "train", "epoch": 2, "step": 4, "nll": 1.0},
        {"event": "epoch", "epoch": 2, "steps": 2, "seconds": 1.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    x, rows = report.training_rows(tmp_path)
    assert x == [0.5, 1.0, 1.5, 2.0]
    assert [r["nll"] for r in rows] == [3.0, 2.0, 1.5, 1.0]


def test_epoch_means_average_steps_then_runs_and_give_the_epochs_last_quarter(tmp_path: Path) -> None:
    """Hand-computed: per epoch the mean over its steps (a resumed step counted once), then over the
    runs; ``@end`` the last quarter of the epoch's steps (at least one)."""
    from orpo_distill.metrics import read_metrics
    from orpo_distill.report.gather import epoch_means

    def write(d: Path, epochs: dict[int, list[float]]) -> Path:
        d.mkdir()
        lines, step = [], 0
        for e, values in epochs.items():
            for v in values:
                step += 1
                lines.append({"event": "train", "epoch": e, "step": step, "or_loss": v, "nll": 2 * v})
            lines.append({"event": "epoch", "epoch": e, "steps": len(values), "seconds": 1.0})
        lines.insert(1, {"event": "train", "epoch": 1, "step": 1, "or_loss": 99.0, "nll": 0.0})  # logged, then
        lines.insert(2, {"event": "resume", "epoch": 0})  # killed: the step's later line is the one kept
        lines.insert(3, dict(lines[0]))
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return d

    a = write(tmp_path / "a", {1: [4.0, 3.0, 2.0, 1.0], 2: [1.0, 0.5]})
    b = write(tmp_path / "b", {1: [2.0, 2.0, 2.0, 3.0], 2: [0.5, 0.5]})
    got = epoch_means([read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")],
                      keys=("or_loss", "nll", "reward_accuracy"))
    assert sorted(got) == [1, 2]
    assert got[1]["or_loss"] == pytest.approx((2.5 + 2.25) / 2)
    assert got[1]["or_loss@end"] == pytest.approx((1.0 + 3.0) / 2)  # the last of 4 steps
    assert got[1]["nll"] == pytest.approx(2 * (2.5 + 2.25) / 2)
    assert got[2]["or_loss"] == pytest.approx((0.75 + 0.5) / 2)
    assert got[2]["or_loss@end"] == pytest.approx((0.5 + 0.5) / 2)
    assert "reward_accuracy" not in got[1]  # not logged: left out, not zero


def test_pair_similarity_by_kind_of_negative_hand_computed() -> None:
    """difflib's ratio on words, 2 x matches / total: "a b c d" against "a b c e" shares 3 of 8 -> 0.75.
    Rows without a rejected side (NLL-only) are left out; SFT rows give nothing."""
    from orpo_distill.text_similarity import pair_similarity, similarity

    def row(chosen: str, rejected: str | None, source: str | None = None, epoch: int | None = None) -> dict:
        return {"chosen": [{"role": "assistant", "content": chosen}],
                "rejected": None if rejected is None else [{"role": "assistant", "content": rejected}],
                "rejected_source": source, "rejected_epoch": epoch}

    assert similarity("A b c d.", "a b c e.") == pytest.approx(2 * 4 / 10)  # words and "." lower-cased
    got = pair_similarity([row("a b c d", "a b c e", "student", 1), row("x y", "z w", "teacher"),
                           row("a b", "a b", "student", 2), row("a b", None)])
    assert got == pytest.approx({"all": (0.75 + 0.0 + 1.0) / 3, "student@1": 0.75, "student@2": 1.0, "teacher": 0.0})
    assert pair_similarity([{"prompt": [], "completion": [{"role": "assistant", "content": "x"}]}]) == {}


def test_distinct_n_and_similarity_on_known_texts() -> None:
    same = ["add 3 then add 4", "add 3 then add 4"]
    assert distinct_n(same, 1) == pytest.approx(4 / 10)  # add, 3, then, 4 out of 10 words
    assert distinct_n(["a b c", "d e f"], 2) == 1.0
    assert mean_pairwise_similarity(same) == 1.0
    assert mean_pairwise_similarity(["a b c d", "w x y z"]) == 0.0
    assert math.isnan(mean_pairwise_similarity(["only one"]))
    div = teacher_diversity([
        {"id": "q1", "text": "a b", "correct": True}, {"id": "q1", "text": "a b", "correct": False},
        {"id": "q2", "text": "c d", "correct": False}, {"id": "q2", "text": "e f", "correct": False},
    ])
    assert div is not None
    assert div["k"] == 2 and div["correct_share"] == 0.25 and div["correct_histogram"] == [1, 1, 0]
    assert div["mean_similarity"] == 0.5 and div["per_question_similarity"] == [1.0, 0.0]


def test_html_is_escaped_and_markdown_tables_are_safe(tmp_path: Path) -> None:
    blocks = [Heading("a <b> title", 1), Para("use `x|y` **now**"), Table(["k"], [["a|b"]])]
    md = report.render_markdown(blocks, tmp_path)
    assert "| a\\|b |" in md
    page = report.render_html(blocks, tmp_path, "t")
    assert "a &lt;b&gt; title" in page and "<code>x|y</code>" in page and "<strong>now</strong>" in page


def test_report_of_something_else_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UserError, match="neither a run directory"):
        report.detect(tmp_path)
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_report_gives_the_generation_cost_per_stage(tmp_path: Path) -> None:
    """The teacher's token totals (what a hosted API bills) summed over every invocation of the stage."""
    events = [
        {"event": "sampling", "stage": "teacher", "requests": 10, "new_samples": 40, "failed_requests": 1,
         "prompt_tokens": 1200, "completion_tokens": 5000, "reasoning_tokens": 3000, "seconds": 12.5},
        {"event": "sampling", "stage": "teacher", "requests": 1, "new_samples": 4, "failed_requests": 0,
         "prompt_tokens": 120, "completion_tokens": 500, "reasoning_tokens": None, "seconds": 1.5},
        {"event": "sampling", "stage": "student/epoch_1", "requests": 10, "new_samples": 20, "failed_requests": 0,
         "prompt_tokens": 0, "completion_tokens": 800, "reasoning_tokens": 0, "seconds": 4.0},
    ]
    (tmp_path / "config.yaml").write_text("train: {epochs: 1}\n")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    md = report.render_markdown(report.run_report(tmp_path), tmp_path)
    assert "## Generation cost" in md
    assert "| teacher | 11 | 44 | 1 | 1320 | 5500 | 3000 | 14 |" in md
    assert "| student/epoch_1 | 10 | 20 | 0 | 0 | 800 | 0 | 4 |" in md
