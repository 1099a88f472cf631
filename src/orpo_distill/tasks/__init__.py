"""Tasks: prompt building, answer extraction and checking.

``build_task(cfg)`` turns the ``task`` section of the config into a task object with ``messages``,
``extract``, ``check`` and ``normalize_gold``; ``extract_answer(task, text, record, finish_reason)`` is
how a caller holding a generator's sample reads its answer (a cut-off text is read differently). The extraction rules live in :mod:`.extract`, the
kinds in :mod:`.base`, user-supplied tasks in :mod:`.custom`.
"""

from __future__ import annotations

from ..config import TaskConfig
from ..errors import UserError
from .base import TASK_KINDS, ExactTask, McqTask, NumericTask, Task, YesNoTask, extract_answer, unletter_choices
from .custom import build_custom_task

__all__ = ["Task", "McqTask", "NumericTask", "YesNoTask", "ExactTask", "TASK_KINDS", "build_task", "extract_answer",
           "unletter_choices"]


def build_task(cfg: TaskConfig | str) -> Task:
    """The task the config describes (a bare kind name such as ``"numeric"`` also works)."""
    if isinstance(cfg, str):
        cfg = TaskConfig(kind=cfg)  # type: ignore[arg-type]
    if cfg.kind == "custom":
        return build_custom_task(cfg)
    if cfg.custom:
        raise UserError(
            f"task.custom is set ({cfg.custom!r}) but task.kind is '{cfg.kind}'; set task.kind: custom to use it"
        )
    return TASK_KINDS[cfg.kind](system_prompt=cfg.system_prompt, instruction=cfg.instruction)
