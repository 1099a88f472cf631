"""``orpo-distill``: one subcommand per stage, plus ``run`` (all stages), ``demo`` and ``export`` (to the Hub).

User errors (bad config, bad input files, missing models) and file-system failures (a full disk, a
read-only run directory) print one clear message and exit 2; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, Sequence

from .errors import UserError, storage_error, storage_message


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run configuration (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.phi=0.25 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="set aside stored samples made with other settings instead of refusing")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _open_run(args: argparse.Namespace) -> Any:
    from .config import load_config
    from .pipeline import Run

    cfg = load_config(args.config, args.overrides)
    return Run(cfg, overwrite=args.overwrite, progress=not args.no_progress, reuse=getattr(args, "reuse", False))


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


# The stage commands run the API's stage (``orpo_distill.stage_result``) and print what it returned.


def cmd_teacher(args: argparse.Namespace) -> None:
    from . import stage_result

    run = _open_run(args)
    print_table(f"teacher traces ({run.layout.teacher_traces})", stage_result(run, "teacher").rows())


def cmd_student(args: argparse.Namespace) -> None:
    from . import stage_result

    run = _open_run(args)
    summary = stage_result(run, "student", args.epoch)
    print_table(f"student samples ({run.layout.student_samples(args.epoch)})", summary.rows())


def cmd_pairs(args: argparse.Namespace) -> None:
    from . import stage_result

    path, data = stage_result(_open_run(args), "pairs")
    print_table(f"pairs for epoch 1 ({path})", [
        ("rows", str(len(data.rows))),
        ("questions dropped: no positive", str(data.dropped_no_positive)),
        ("questions dropped: no negative", str(data.dropped_no_negative)),
        ("questions paired with teacher negatives (fallback)", str(data.teacher_fallback)),
        ("questions as NLL-only rows (fallback)", str(data.nll_only)),
    ])


def cmd_train(args: argparse.Namespace) -> None:
    from . import stage_result

    run = _open_run(args)
    result = stage_result(run, "train")
    print_table(f"training ({run.dir})", [(k, str(v)) for k, v in result.items()])


def cmd_eval(args: argparse.Namespace) -> None:
    from . import stage_result

    run = _open_run(args)
    epoch = run.latest_epoch() if args.epoch is None else args.epoch
    s = stage_result(run, "eval", epoch)
    print_table(f"evaluation after epoch {epoch} ({run.layout.eval_dir})", eval_rows(s))


def eval_rows(s: Any) -> list[tuple[str, str]]:
    rows = [
        ("questions", str(s.n)),
        ("accuracy", f"{s.accuracy:.1%}  (95% CI {s.ci95[0]:.1%}-{s.ci95[1]:.1%})"),
        ("parse failures", f"{s.parse_failures} ({s.parse_failure_rate:.1%})"),
        ("mean response tokens", f"{s.mean_length:.1f}"),
    ]
    if s.self_consistency_k:
        rows.append((f"self-consistency@{s.self_consistency_k}", f"{s.self_consistency_accuracy:.1%}"))
    if s.option_text_match is not None:
        rows.append(("computes the gold option / letter = own working",
                     f"{s.option_text_match:.1%} / {s.letter_text_agreement:.1%}"))
    if s.warning:
        rows.append(("WARNING", s.warning))
    return rows


def cmd_run(args: argparse.Namespace) -> None:
    _run_and_report(_open_run(args))


def _run_and_report(run: Any) -> None:
    import time

    from .evaluation import paired_bootstrap_diff
    from .store import read_jsonl

    t0, started = time.perf_counter(), time.time()
    out = run.run_all()
    minutes = (time.perf_counter() - t0) / 60
    print_table("teacher traces", out["teacher"].rows())
    if "student" in out:
        print_table("initial student samples", out["student"].rows())
    last = run.cfg.train.epochs
    after = out["eval_after"]
    rows = [("after epoch %d: accuracy" % last, f"{after.accuracy:.1%}  (95% CI {after.ci95[0]:.1%}-{after.ci95[1]:.1%})")]
    if "eval_before" in out:
        before = out["eval_before"]
        split = run.cfg.eval.split
        b = [r["correct"] for r in read_jsonl(run.layout.eval_rows(split, 0))]
        a = [r["correct"] for r in read_jsonl(run.layout.eval_rows(split, last))]
        diff, lo, hi = paired_bootstrap_diff(b, a)
        rows = [
            ("held-out questions", str(before.n)),
            ("before: accuracy", f"{before.accuracy:.1%}  (95% CI {before.ci95[0]:.1%}-{before.ci95[1]:.1%})"),
            *rows,
            ("change (paired bootstrap 95% CI)", f"{diff:+.1%}  ({lo:+.1%} to {hi:+.1%})"),
            ("before: parse failures / mean tokens", f"{before.parse_failure_rate:.1%} / {before.mean_length:.0f}"),
        ]
    rows.append(("after: parse failures / mean tokens", f"{after.parse_failure_rate:.1%} / {after.mean_length:.0f}"))
    rows += [(f"{when}: WARNING", s.warning) for when, s in (("before", out.get("eval_before")), ("after", after))
             if s is not None and s.warning]
    rows.append(("wall-clock (this invocation)", f"{minutes:.1f} min"))
    print_table(f"{result_title(run.cfg)} ({run.dir})", rows)
    from .memory import lifetime_peak_rss_mib
    from .metrics import read_metrics, stage_costs

    costs = stage_costs(read_metrics(run.layout.metrics), started)
    if costs:
        print_table("time and peak memory per stage (this invocation; metrics.jsonl)",
                    [(name, f"{s / 60:.1f} min, peak RSS {peak / 1024:.2f} GiB") for name, s, peak in costs]
                    + [("whole process", f"peak RSS {lifetime_peak_rss_mib() / 1024:.2f} GiB")])


def result_title(cfg: Any) -> str:
    """The end-of-run table's title: the method and the variant it amounts to (compare's names):
    "SFT result: sft-single", "ORPO result: orpo-mixed, phi 0.5", "ORPO result: orpo-teacher-neg"."""
    t = cfg.train
    if t.method == "sft":
        return f"SFT result: sft-{'single' if t.traces == 'single' else 'diverse'}"
    if cfg.pairs.negatives == "teacher":
        return "ORPO result: orpo-teacher-neg"
    from .config import phi_text

    name = f"orpo-{t.policy}"
    if t.policy == "mixed":
        name += f", phi {phi_text(t.phi)}"
    if cfg.pairs.negatives == "both":
        name += ", student and teacher negatives"
    return f"ORPO result: {name}"


def cmd_demo(args: argparse.Namespace) -> None:
    from importlib.resources import files

    args.config = str(files("orpo_distill") / "configs" / "demo.yaml")
    cmd_run(args)


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--variants", action="append", default=[], metavar="A,B,...",
                   help="variants to compare (default: sft-single, sft-diverse, orpo-teacher-neg, orpo-off, orpo-on, "
                        "orpo-mixed); orpo-mixed@PHI sets phi, e.g. orpo-mixed@0.25; VARIANT+lambda=X, +lr=X or +rows=N "
                        "changes one knob, e.g. orpo-mixed+lambda=0 (the odds-ratio term off), +rows=1 (every pair its "
                        "own row, SFT's batching)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="the small size: at most 64 training and 100 held-out questions, 2 epochs, 1 seed")
    p.add_argument("--out", default=None,
                   help="comparison folder (default: the config's run_dir, plus -quick with --quick)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: write comparison.json/.md and the report from the runs finished so far (the "
                        "others listed as missing), e.g. while the comparison is still going in another process; "
                        "with --seeds N, of the plan's first N seeds only; with --variants, of those variants only "
                        "(the plan's, e.g. the six of the paper in a folder that also holds ablations)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every run's checkpoints/ (default: removed once the run is finished)")
    p.add_argument("--keep-models", action="store_true",
                   help="keep every finished run's exported weights in model/ (default: replaced by model/removed.json; "
                        "the table and the report read only the evaluations and metrics)")
    p.add_argument("--no-share-first-epoch", action="store_true",
                   help="train every arm whole (default: arms that differ only in their refresh, orpo-off, orpo-on, "
                        "orpo-mixed@PHI, train their common first epoch once per seed and start from it)")
    p.add_argument("--archive", default=None, metavar="DIR",
                   help="run nothing: copy what the table, the report and a later resume need (plan.json, the shared "
                        "runs, the finished runs without weights) to DIR, e.g. to keep in git or carry to another "
                        "machine; `compare --out DIR` on it runs only the runs not finished")


def cmd_compare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .compare import QUICK_SEEDS, load_plan, quick_config, run_comparison, table_variants, tabulate
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.quick:
        cfg = quick_config(cfg)
    n = args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else 3)
    if n < 1:
        raise UserError(f"--seeds must be at least 1, got {n}")
    out = Path(args.out or cfg.run_dir)
    if args.archive:
        from .compare.archive import archive_comparison

        done = archive_comparison(load_plan(out), Path(args.archive))
        print(f"archived {len(done['finished'])} finished runs ({done['bytes'] / 2**20:.1f} MiB with the shared runs) "
              f"to {args.archive}; left out, not finished: {', '.join(done['left_out']) or 'none'}")
        return
    if args.table_only:  # --seeds N: the plan's first N seeds; --variants: those of the plan's variants
        plan = load_plan(out)
        tabulate(dataclasses.replace(plan, seeds=plan.seeds if args.seeds is None else plan.seeds[:n],
                                     variants=table_variants(plan, args.variants)))
    else:
        run_comparison(cfg, args.variants, [cfg.seed + i for i in range(n)], out, progress=not args.no_progress,
                       overwrite=args.overwrite, keep_checkpoints=args.keep_checkpoints, keep_models=args.keep_models,
                       share_first_epoch=not args.no_share_first_epoch)
    from .layout import CompareLayout

    print(CompareLayout(out).comparison_md.read_text(encoding="utf-8"))
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run directory (config.yaml, metrics.jsonl) or a comparison folder (comparison.json)")


def cmd_report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .report import write_report

    path = write_report(Path(args.path))
    print(f"wrote {path}, {path.with_suffix('.html')} and {path.parent / 'plots'}/")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory whose model/ holds the exported student")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="upload model/ to this Hugging Face model repository (created if missing); the token comes "
                        "from HF_TOKEN or `hf auth login` and is never stored")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")


def cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .model_card import export_card, push_to_hub

    if args.private and not args.push_to_hub:
        raise UserError("--private goes with --push-to-hub REPO_ID")
    if args.push_to_hub:
        url = push_to_hub(Path(args.run_dir), args.push_to_hub, private=args.private)
        print(f"uploaded {Path(args.run_dir) / 'model'} to {url}")
    else:
        print(f"wrote {export_card(Path(args.run_dir))}")


# Commands whose arguments differ from the common ones (config, --set, --overwrite, --no-progress).
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "compare": _compare_arguments,
    "report": _report_arguments,
    "export": _export_arguments,
}


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "teacher": (cmd_teacher, "sample and verify teacher traces"),
    "student": (cmd_student, "sample the student's traces (negatives)"),
    "pairs": (cmd_pairs, "build the preference pairs of epoch 1"),
    "train": (cmd_train, "train (resumes after the last complete checkpoint)"),
    "eval": (cmd_eval, "evaluate the student on the held-out split"),
    "run": (cmd_run, "every stage in order, skipping finished ones"),
    "demo": (cmd_demo, "the embedded default: synthetic task, scripted teacher, SmolLM2-135M student"),
    "compare": (cmd_compare, "run several variants and seeds on shared traces; one table and a report"),
    "report": (cmd_report, "report.md, report.html and plots from a run directory or a comparison folder"),
    "export": (cmd_export, "write model/README.md (the model card) again; --push-to-hub REPO_ID uploads model/"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orpo-distill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "demo":
            p.set_defaults(config=None, overrides=[])
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
            p.add_argument("--overwrite", action="store_true")
            p.add_argument("--no-progress", action="store_true")
        elif name in ARGUMENTS:
            ARGUMENTS[name](p)
        else:
            _add_common(p)
            p.add_argument("--reuse", action="store_true",
                           help="keep checkpoints, model and evaluations made with other training settings (resume "
                                "from them on purpose) instead of setting them aside and training again")
        if name == "student":
            p.add_argument("--epoch", type=int, default=1, help="sample before this epoch (1: the initial student)")
        if name == "eval":
            p.add_argument("--epoch", type=int, default=None, help="checkpoint to evaluate (0: before training; default: latest)")
        p.set_defaults(func=fn)
    return parser


def _quiet_libraries() -> None:
    """Our stages draw their own progress bars; the libraries' per-file loading bars are noise."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        args.func(args)
    except UserError as e:
        print(f"orpo-distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("orpo-distill: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    except Exception as e:
        disk = storage_error(e)  # a full disk or a read-only run directory: the machine's state, not a bug
        if disk is None:
            raise
        print(f"orpo-distill: error: {storage_message(disk)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
