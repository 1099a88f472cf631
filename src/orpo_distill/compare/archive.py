"""``compare --archive DIR``: a comparison folder cut down to what its table, its report and a later
resume need, small enough to keep in version control or carry to another machine.

An archive is itself a comparison folder: ``plan.json``; each shared run without weights (teacher
traces, initial student samples, base evaluation, prompts, metrics); and each *finished* run's
configuration, metrics, evaluations and ``model/training_settings.json``, with ``model/removed.json``
in place of the weights. ``compare --out DIR`` on a copy of it tabulates the finished runs as they were
and runs only the others.

A run not yet finished is left out: resuming it needs its checkpoints (1.6 GB an epoch for a 135M
student), and the refresh samples it may already hold were drawn from weights that another machine's
arithmetic would not reproduce bit for bit. Its rerun starts from the shared files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError
from ..layout import MODEL_SETTINGS, RunLayout
from .plan import Plan, is_finished
from ..store import atomic_write_json
from .run import copy_atomic, weights_note
from .variants import variant_config

# what a finished run keeps in an archive (paths relative to its folder)
FINISHED_RUN_FILES = ("config.yaml", "metrics.jsonl", "eval")
# what a shared run leaves out (it has no trained weights; these would be another run's state)
SHARED_LEFT_OUT = ("checkpoints", "model")


def _copy_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> int:
    """Copy the files under ``src`` to ``dst`` (each atomically), skipping top-level names in ``skip``;
    returns the bytes copied."""
    copied = 0
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.parts[0] in skip or not path.is_file() or path.name.endswith(".tmp"):
            continue
        copy_atomic(path, dst / rel)
        copied += path.stat().st_size
    return copied


def _archive_finished_run(src: RunLayout, dst: RunLayout) -> int:
    copied = 0
    for name in FINISHED_RUN_FILES:
        path = src.root / name
        if path.is_dir():
            copied += _copy_tree(path, dst.root / name)
        elif path.is_file():
            copy_atomic(path, dst.root / name)
            copied += path.stat().st_size
    if src.model_settings.is_file():
        copy_atomic(src.model_settings, dst.model_settings)
    if src.model_removed.is_file():
        copy_atomic(src.model_removed, dst.model_removed)
    else:  # the weights stay in the source folder; the archive says where they went
        atomic_write_json(dst.model_removed, weights_note(src.model, f"archived without its weights (they stay in {src.model})"))
    return copied


def archive_comparison(plan: Plan, dest: Path) -> dict[str, Any]:
    """Write the archive of ``plan``'s folder to ``dest`` (a new folder, or an archive of the same
    comparison, which is brought up to date). Returns what went in: the finished runs, the ones left
    out, and the bytes copied."""
    dest = Path(dest)
    src_layout, dst_layout = plan.layout, type(plan.layout)(dest)
    if dest.resolve() == plan.dir.resolve():
        raise UserError(f"--archive {dest}: that is the comparison folder itself; name another folder")
    if dest.exists() and any(dest.iterdir()) and not dst_layout.plan.is_file():
        raise UserError(f"--archive {dest}: the folder holds other files and no plan.json; name an empty or new folder")
    copied = 0
    for seed in plan.seeds:
        shared = src_layout.shared(seed)
        if shared.root.is_dir():
            copied += _copy_tree(shared.root, dst_layout.shared(seed).root, skip=SHARED_LEFT_OUT)
    finished, left_out = [], []
    for variant in plan.variants:
        for seed in plan.seeds:
            run = src_layout.run(variant, seed)
            name = f"{variant}/seed_{seed}"
            if is_finished(run.root, variant_config(plan.base, plan.dir, variant, seed)):
                copied += _archive_finished_run(run, dst_layout.run(variant, seed))
                finished.append(name)
            else:
                left_out.append(name)
    copy_atomic(src_layout.plan, dst_layout.plan)  # last: a folder without it is not yet an archive
    return {"finished": finished, "left_out": left_out, "bytes": copied}

