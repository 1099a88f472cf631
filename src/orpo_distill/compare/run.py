"""Running a comparison: the shared run of each seed, then each variant's run on its copied files.

Why share: the variants differ only in how they train, so giving them the same teacher traces, the
same initial student negatives and the same base evaluation both saves the generation time and makes
their comparison paired (the same data, only the method changes). The shared files are copied into
each run folder before its stages start; the trace stores then find them complete and generate
nothing. The stores check the settings hash (generator, sampling settings, task), and the variants
only touch training fields, so a copied file is accepted exactly when it is what the run would have
generated itself.

Every run is resumable like ``orpo-distill run``: rerunning ``compare`` skips finished runs (a run is
finished when its final evaluation is on disk) and continues a killed one from its last checkpoint.
A finished run keeps its evaluations, metrics and configuration; its checkpoints are removed, and its
exported weights too unless ``keep_models`` (538 MB a run for a 135M student; the table and the report
never read them). See docs/architecture.md.
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from ..config import RunConfig
from ..errors import UserError
from ..evaluation import base_splits
from ..layout import MODEL_REMOVED, MODEL_SETTINGS, RunLayout, eval_key
from ..provenance import uses_initial_student
from ..report import write_report
from ..store import atomic_write_json, copy_atomic
from .aggregate import aggregate, write_comparison
from .first_epoch import cache_dir, first_epoch_key, keep_first_epoch, start_from_first_epoch
from .plan import Plan, is_finished, open_plan
from .variants import parse_variants, shared_config, variant_config


def seed_from_shared(shared: RunLayout, target: RunLayout, files: Sequence[Path], keys: Sequence[str]) -> None:
    """Put the shared files into a run folder (where it has none yet) and the base evaluations'
    summary entries ``keys`` into its ``eval/summary.json``. ``files``: paths in ``target``, each copied
    from the same place in ``shared``."""
    for dst in files:
        src = shared.root / dst.relative_to(target.root)
        if src.is_file() and not dst.exists():
            copy_atomic(src, dst)
    for key in keys:
        entry = shared.eval_summaries().get(key)
        mine = target.eval_summaries()
        if entry is not None and key not in mine:
            atomic_write_json(target.eval_summary, {**mine, key: entry})


def base_evaluations(cfg: RunConfig, layout: RunLayout) -> tuple[list[Path], list[str]]:
    """:func:`base_splits` as files in ``layout`` and summary keys."""
    return [layout.eval_rows(s, 0) for s in base_splits(cfg)], [eval_key(s, 0) for s in base_splits(cfg)]


def teacher_files(cfg: RunConfig, layout: RunLayout) -> list[Path]:
    """The teacher's stores every arm shares: its traces, and its dev traces with a dev split."""
    return [layout.teacher_traces, *([layout.teacher_dev_traces] if cfg.dataset.dev_size else [])]


def weights_note(model_dir: Path, why: str) -> dict[str, Any]:
    """What ``model/removed.json`` says: when, why, and the files the weights were (name -> bytes)."""
    keep = {MODEL_SETTINGS, MODEL_REMOVED}
    return {"removed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "why": why,
            "files": {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file() and p.name not in keep}}


def remove_weights(layout: RunLayout) -> None:
    """Replace a finished run's exported weights by ``model/removed.json``; ``model/training_settings.json``
    stays, so the run's provenance checks still see what trained. Safe to call again after a kill in the
    middle: it finishes the removal."""
    if not layout.model.is_dir() or not (layout.has_model() or layout.model_removed.is_file()):
        return  # nothing was exported
    if not layout.model_removed.is_file():
        atomic_write_json(layout.model_removed, weights_note(
            layout.model, "orpo-distill compare keeps a finished run's evaluations, not its weights "
                          "(--keep-models keeps them)"))
    for p in sorted(layout.model.iterdir()):
        if p.name not in (MODEL_SETTINGS, MODEL_REMOVED):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _drop_finished_outputs(target: RunLayout, keep_checkpoints: bool, keep_models: bool) -> None:
    if not keep_checkpoints:  # 1.6 GB per epoch for a 135M model (weights and Adam state)
        shutil.rmtree(target.checkpoints, ignore_errors=True)
    if not keep_models:
        remove_weights(target)


def _check_same_settings(shared_run: Any, run: Any, variant: str) -> None:
    """The variants must not change what the shared traces were generated with."""
    layout = RunLayout(run.cfg.run_dir)
    pairs = [(layout.teacher_traces, shared_run.teacher_store(), run.teacher_store())]
    if uses_initial_student(run.cfg):
        pairs.append((layout.student_samples(1), shared_run.student_store(1), run.student_store(1)))
    for path, a, b in pairs:
        if a.settings != b.settings:
            rel = path.relative_to(layout.root).as_posix()
            raise UserError(f"variant {variant} would sample {rel} with other settings than the shared run "
                            f"({b.settings} vs {a.settings}); variants may only change training fields")


def _require_complete(summary: Any, k: int, what: str, where: Path) -> None:
    """Shared samples must be complete: a variant that found a gap would fill it with its own draw, and
    the variants would no longer train on the same data."""
    if summary.samples < summary.questions * k:
        raise UserError(f"{where}: {summary.questions * k - summary.samples} {what} are missing "
                        f"({summary.failed_requests} failed requests); rerun the same command to retry them")


def prepare_shared(plan: Plan, seed: int, variants: Sequence[str], progress: bool, overwrite: bool) -> Any:
    """The shared run of ``seed``: teacher traces (copied from the first seed's), the initial
    student's samples (when one of ``variants`` uses them), and the base model's evaluation (copied
    from the first seed's when greedy)."""
    from ..pipeline import Run

    cfg = shared_config(plan.base, plan.dir, seed)
    first = plan.layout.shared(plan.seeds[0])
    here = plan.layout.shared(seed)
    if here != first:
        if not first.teacher_traces.is_file():  # the teacher traces come from the first seed
            prepare_shared(plan, plan.seeds[0], [], progress, overwrite)
        files = teacher_files(cfg, here)
        evals, keys = base_evaluations(cfg, here)
        greedy_only = cfg.eval.self_consistency == 0  # greedy decoding of the base does not depend on the seed
        seed_from_shared(first, here, files + (evals if greedy_only else []), keys if greedy_only else [])
    run = Run(cfg, overwrite=overwrite, progress=progress)
    _require_complete(run.teacher(), cfg.teacher.sampling.samples, "teacher traces", here.root)
    if any(uses_initial_student(variant_config(plan.base, plan.dir, v, seed)) for v in variants):
        _require_complete(run.student(epoch=1), cfg.student.sampling.samples, "initial student samples", here.root)
    for split in base_splits(cfg):
        run.evaluate(0, split=split)
    return run


def run_variant(plan: Plan, variant: str, seed: int, shared_run: Any, progress: bool, overwrite: bool,
                keep_checkpoints: bool, keep_models: bool = False, share_first_epoch: bool = True,
                log: Any = print) -> bool:
    """One variant and seed, resumed where it stopped. Returns False when it was already finished.
    ``share_first_epoch``: start from, or keep for its siblings, the epoch 1 that arms differing only in
    their refresh have in common (``first_epoch``)."""
    from ..pipeline import Run

    cfg = variant_config(plan.base, plan.dir, variant, seed)
    target = RunLayout(cfg.run_dir)
    key = first_epoch_key(cfg) if share_first_epoch else None
    others = [variant_config(plan.base, plan.dir, v, seed) for v in plan.variants if v != variant] if key else []
    siblings = [c for c in others if first_epoch_key(c) == key]
    cache = cache_dir(plan.dir, seed, key) if key and siblings else None  # nothing to share with: no cache
    if is_finished(target.root, cfg):
        if cache is not None:  # killed after finishing, before its epoch 1 was kept
            keep_first_epoch(target, cache)
        _drop_finished_outputs(target, keep_checkpoints, keep_models)  # a kill may have come in the middle of it
        return False
    evals, keys = base_evaluations(cfg, target)
    files = teacher_files(cfg, target) + evals
    if uses_initial_student(cfg):
        files.append(target.student_samples(1))
    seed_from_shared(RunLayout(shared_run.dir), target, files, keys)
    if cache is not None and not cfg.eval.every_epoch and start_from_first_epoch(cache, target, cfg):
        log(f"[compare] {variant}, seed {seed}: starts from the shared epoch 1 in {cache}")
    run = Run(cfg, overwrite=overwrite, progress=progress)
    _check_same_settings(shared_run, run, variant)
    run.run_all()
    del run
    gc.collect()
    if cache is not None:
        keep_first_epoch(target, cache)
    if is_finished(target.root, cfg):
        _drop_finished_outputs(target, keep_checkpoints, keep_models)
    if cache is not None and all(is_finished(RunLayout(c.run_dir).root, c) for c in [cfg, *siblings]):
        shutil.rmtree(cache, ignore_errors=True)  # every arm of the key is done: give the disk back
    return True


def run_comparison(base: RunConfig, variants: Sequence[str], seeds: Sequence[int], compare_dir: Path | None = None,
                   progress: bool = True, overwrite: bool = False, keep_checkpoints: bool = False,
                   keep_models: bool = False, log: Any = print, share_first_epoch: bool = True) -> dict[str, Any]:
    """Run every requested variant and seed not yet finished, then write comparison.json/.md and the
    report, which cover everything the folder's plan holds (earlier invocations included)."""
    compare_dir = Path(compare_dir or base.run_dir)
    variants, seeds = parse_variants(variants), list(seeds)
    plan = open_plan(compare_dir, base, variants, seeds)
    total, i = len(variants) * len(seeds), 0
    for seed in seeds:
        shared_run = prepare_shared(plan, seed, variants, progress, overwrite)
        for variant in variants:
            i += 1
            log(f"[compare] ({i}/{total}) {variant}, seed {seed}")
            if not run_variant(plan, variant, seed, shared_run, progress, overwrite, keep_checkpoints, keep_models,
                               share_first_epoch, log):
                log(f"[compare] ({i}/{total}) {variant}, seed {seed}: finished earlier, skipped")
        del shared_run
        gc.collect()
    return tabulate(plan)


def table_variants(plan: Plan, specs: Sequence[str] | None) -> list[str]:
    """The plan's variants named by ``specs`` (``--variants``), in the plan's order; all of them when none
    is named. A name the plan does not hold is an error: it was never run in this folder."""
    if not specs:
        return list(plan.variants)
    wanted = parse_variants(specs)
    unknown = [v for v in wanted if v not in plan.variants]
    if unknown:
        raise UserError(f"{', '.join(unknown)} not in the comparison at {plan.dir} (its variants: "
                        f"{', '.join(plan.variants)})")
    return [v for v in plan.variants if v in wanted]


def tabulate(plan: Plan) -> dict[str, Any]:
    """comparison.json/.md and the report from the runs of ``plan`` finished so far (the others listed
    as missing); nothing is run. ``compare --table-only`` calls it while a comparison is still going."""
    result = aggregate(plan)
    write_comparison(plan.dir, result)
    write_report(plan.dir)
    return result
