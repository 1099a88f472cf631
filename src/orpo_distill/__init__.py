"""orpo-distill: distil a large teacher's reasoning into a small student with ORPO-Distill (arXiv 2509.25100).

The Python API: what the ``orpo-distill`` commands do, as functions. A config is a YAML path, a dict (what
the YAML would hold) or a :class:`~orpo_distill.config.RunConfig`; every call reads and writes one run folder
(``config.run_dir``), so a call that is repeated skips what is done, as the commands do::

    import orpo_distill as od

    cfg = od.load_config("configs/demo.yaml", overrides={"train.phi": 0.25, "run_dir": "runs/phi25"})
    res = od.run(cfg)                            # every stage: teacher, student, train, eval
    print(res.before.accuracy, res.after.accuracy, res.after.ci95, res.model_dir)
    od.run_stage(cfg, "teacher")                 # one stage: teacher, student, pairs, train, eval, report
    table = od.compare_variants(cfg, ["orpo-off", "orpo-mixed"], seeds=2)   # comparison.json as a dict
    od.results("runs/phi25")                     # a finished run's evaluations
    od.push_to_hub("runs/phi25", "me/my-student")                          # model/ and its card to the Hub

Importing the package is cheap: each function imports what it uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["STAGES", "Results", "compare_variants", "load_config", "push_to_hub", "results", "run", "run_stage",
           "stage_result"]

STAGES = ("teacher", "student", "pairs", "train", "eval", "report")


def load_config(source: Any = None, overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Any:
    """A validated :class:`~orpo_distill.config.RunConfig` from a YAML path, a dict, a RunConfig, or None (the
    defaults: the demo's synthetic task, scripted teacher and builtin student). ``overrides``: ``--set``
    strings (``["train.phi=0.25"]``) or dotted keys with Python values (``{"train.phi": 0.25}``). A wrong
    field raises :class:`~orpo_distill.errors.UserError` naming it."""
    import copy

    from .config import RunConfig, apply_overrides, build_config, read_yaml, resolved_dict, set_dotted

    if isinstance(source, RunConfig):
        data, name = resolved_dict(source), "config"
    elif isinstance(source, Mapping):
        data, name = copy.deepcopy(dict(source)), "dict"
    elif source is None:
        data, name = {}, "defaults"
    else:
        data, name = read_yaml(source), str(source)
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            set_dotted(data, key, value)
    else:
        data = apply_overrides(data, [overrides] if isinstance(overrides, str) else list(overrides or []))
    return build_config(data, source=name)


def _config(config: Any) -> Any:
    from .config import RunConfig

    return config if isinstance(config, RunConfig) else load_config(config)


def _open_run(config: Any, overwrite: bool, reuse: bool, progress: bool) -> Any:
    from .pipeline import Run

    return Run(_config(config), overwrite=overwrite, progress=progress, reuse=reuse)


@dataclass(frozen=True)
class Results:
    """A run's evaluations (``eval/summary.json``) and where its model is.

    ``evaluations``: every entry by eval key (``eval_epoch_0``, ``dev_epoch_1``, ...), as
    :class:`~orpo_distill.evaluation.EvalSummary` (``accuracy``, ``ci95``, ``n``, ``parse_failure_rate``, ...)."""

    run_dir: Path
    evaluations: dict[str, Any]
    split: str = "eval"  # the held-out split the run evaluates (eval.split)
    epochs: int | None = None  # train.epochs (None: not known, the last evaluated epoch is taken)

    def at(self, epoch: int, split: str | None = None) -> Any:
        """The evaluation after ``epoch`` (0: before training) on ``split`` (default: the held-out one)."""
        return self.evaluations.get(f"{split or self.split}_epoch_{epoch}")

    @property
    def before(self) -> Any:
        """The student before training (None: not evaluated)."""
        return self.at(0)

    @property
    def after(self) -> Any:
        """The student after the last epoch (None: not evaluated yet)."""
        from .layout import eval_key_epoch

        last = self.epochs
        if last is None:
            epochs = [e for k in self.evaluations if (e := eval_key_epoch(k, self.split)) is not None and e > 0]
            last = max(epochs, default=None)
        return None if last is None else self.at(last)

    @property
    def model_dir(self) -> Path | None:
        """``model/``, the exported student (``from_pretrained``, with its README.md card); None when absent
        or removed by ``compare``."""
        from .layout import RunLayout

        layout = RunLayout(self.run_dir)
        return layout.model if layout.has_model() else None


def results(run_dir: str | Path) -> Results:
    """What a run folder's evaluations say (:class:`Results`); its ``config.yaml`` names the held-out split
    and the epochs. A folder that does not exist raises :class:`~orpo_distill.errors.UserError`."""
    from .errors import UserError
    from .evaluation import EvalSummary
    from .layout import RunLayout

    layout = RunLayout(Path(run_dir))
    if not layout.root.is_dir():
        raise UserError(f"{layout.root}: no such run directory")
    split, epochs = "eval", None
    if layout.config.is_file():
        cfg = load_config(layout.config)
        split, epochs = cfg.eval.split, cfg.train.epochs
    evaluations = {k: EvalSummary.from_dict(v) for k, v in layout.eval_summaries().items()}
    return Results(run_dir=layout.root, evaluations=evaluations, split=split, epochs=epochs)


def run(config: Any, overwrite: bool = False, reuse: bool = False, progress: bool = True) -> Results:
    """Every stage of one run in order (``orpo-distill run``), skipping what is complete; its :class:`Results`.
    ``overwrite``: set aside stored samples made with other settings instead of refusing; ``reuse``: keep
    weights trained with other settings."""
    r = _open_run(config, overwrite, reuse, progress)
    r.run_all()
    return results(r.dir)


def run_stage(config: Any, stage: str, epoch: int | None = None, overwrite: bool = False, reuse: bool = False,
              progress: bool = True) -> Any:
    """One stage, with the stages it needs, as the command of that name does. Returns the stage's result:
    ``teacher``/``student``: a SampleSummary (``student``: before ``epoch``, default 1: the initial student; a
    later epoch: the checkpoint of the epoch before samples every question, ``Run.sample_student``); ``pairs``: the path of
    ``pairs/epoch_1.jsonl``; ``train``: a dict (epochs, resumed_from, ...); ``eval``: an EvalSummary after
    ``epoch`` (default: the newest trained epoch, ``Run.latest_epoch``); ``report``: report.md's path."""
    from .errors import UserError

    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    cfg = _config(config)
    if stage == "report":
        from .report import write_report

        return write_report(Path(cfg.run_dir))
    result = stage_result(_open_run(cfg, overwrite, reuse, progress), stage, epoch)
    return result[0] if stage == "pairs" else result


def stage_result(r: Any, stage: str, epoch: int | None = None) -> Any:
    """One stage of the open run ``r`` (a ``pipeline.Run``), what :func:`run_stage` and the CLI's stage commands
    both do: ``pairs`` returns (path, the epoch's rows), the others as :func:`run_stage` says."""
    if stage == "teacher":
        return r.teacher()
    if stage == "student":
        return r.sample_student(epoch or 1)
    if stage == "eval":
        return r.evaluate(r.latest_epoch() if epoch is None else epoch)
    if stage == "pairs":
        return r.pairs()
    r.check_training_environment()
    r.inputs()
    return r.train()


def compare_variants(config: Any, variants: Sequence[str] | None = None, seeds: int | Sequence[int] = 1,
                     out: str | Path | None = None, progress: bool = True, **options: Any) -> dict[str, Any]:
    """``orpo-distill compare``: each variant (default: the paper's six; ``orpo-mixed@0.25``,
    ``orpo-mixed+lambda=0`` and the like too) with each seed, on shared teacher traces, into ``out``
    (default: ``config.run_dir``). ``seeds``: how many (from ``config.seed`` on) or which. ``options``:
    ``keep_checkpoints``, ``keep_models``, ``overwrite``, ``share_first_epoch`` (``compare.run_comparison``).
    Returns comparison.json's content. (Not named ``compare``: that is the subpackage's name.)"""
    from .compare import run_comparison

    cfg = _config(config)
    chosen = [cfg.seed + i for i in range(seeds)] if isinstance(seeds, int) else list(seeds)
    return run_comparison(cfg, list(variants or []), chosen, Path(out) if out else None, progress=progress, **options)


def push_to_hub(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload ``run_dir/model/`` with its card to the Hugging Face model repository ``repo_id``
    (``orpo-distill export RUN_DIR --push-to-hub REPO_ID``); the token is ``HF_TOKEN`` or
    ``hf auth login``'s, never stored. Returns the repository's URL."""
    from .model_card import push_to_hub as push

    return push(Path(run_dir), repo_id, private=private)
