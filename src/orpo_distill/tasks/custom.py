"""User-supplied tasks: ``task.custom: "module:function"``, run only with ``task.allow_custom_code``.

Why it exists: real datasets have answer formats no built-in kind reads (code, chemical formulas,
units that must match). The user names one callable; what it is decides how it is used:

- **Extractor**: a function taking two required positional arguments, ``fn(text, record)``, returning
  the answer string or ``None``. It is used as the answer extractor on top of the ``exact`` task: the
  ``exact`` prompt and instruction, and the ``exact`` check (its result and the gold answer compared
  after lower-casing, whitespace and trailing punctuation), so it should return answers in the form
  the gold answers take. ``record`` is ``None`` when a caller extracts without one.
- **Factory**: anything else (a class, or a function of zero or one argument) is called once, with the
  :class:`~orpo_distill.config.TaskConfig` if it takes an argument, and must return a task-like object
  with an ``extract(text)`` or ``extract(text, record)`` method. ``messages``, ``check`` and
  ``normalize_gold`` are used when present, else the ``exact`` task's stand in. A factory may also
  return one of the built-in task classes (``NumericTask(instruction=...)``), which is used as is.

``module`` is an importable module name (the current directory is searched last) or a path to a
``.py`` file. User code that raises while extracting or checking is counted and logged, and the
answer counts as unparsed (or wrong): one odd output must not stop a paid teacher run.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..config import TaskConfig
from ..errors import UserError
from ..records import Record
from .base import ExactTask, Message, Task
from .extract import normalize_exact

log = logging.getLogger(__name__)


def _import_module(name: str) -> Any:
    try:
        if name.endswith(".py"):
            path = Path(name)
            if not path.is_file():
                raise UserError(f"task.custom: module file not found: {path}")
            spec = importlib.util.spec_from_file_location(f"orpo_distill_custom_{path.stem}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        return importlib.import_module(name)
    except UserError:
        raise
    except Exception as e:  # ImportError, SyntaxError, or anything the module raises on import
        raise UserError(f"task.custom: cannot import module '{name}': {type(e).__name__}: {e}") from None


def load_callable(spec: str) -> Callable[..., Any]:
    """``"module:function"`` (or ``"path/to/file.py:function"``, ``"module:Class.method"``) -> the callable."""
    module_name, sep, attr = spec.strip().rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"task.custom must look like 'module:function', got {spec!r}")
    obj: Any = _import_module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"task.custom: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"task.custom: '{spec}' is a {type(obj).__name__}, not a function or class")
    return obj


def _positional(fn: Callable[..., Any]) -> tuple[int, int]:
    """(required positional parameters, accepted positional parameters; 99 with ``*args``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 0, 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in sig.parameters.values() if p.kind in kinds]
    required = sum(p.default is inspect.Parameter.empty for p in params)
    var = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())
    return required, 99 if var else len(params)


def _takes_record(method: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):
        return False
    if "record" in sig.parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return True
    return _positional(method)[1] >= 2


def _complain(task: Any, what: str, err: Exception) -> None:
    task.failures[what] = task.failures.get(what, 0) + 1
    if task.failures[what] == 1:
        log.warning("task.custom %s: %s raised %s: %s (counted as unparsed/wrong; logged once)",
                    task.name, what, type(err).__name__, err)


@dataclass(frozen=True)
class ExtractorTask(ExactTask):
    """The ``exact`` task with the user's ``fn(text, record)`` as its extractor."""

    kind: ClassVar[str] = "custom"

    extractor: Callable[[str, Record | None], Any] | None = None
    name: str = ""
    failures: dict[str, int] = field(default_factory=dict, compare=False)

    def extract(self, text: str, record: Record | None = None, finish_reason: str | None = None) -> str | None:
        # the user's fn(text, record) sees the text only; a cut-off text is for it to judge
        assert self.extractor is not None
        try:
            value = self.extractor(text, record)
        except Exception as e:
            _complain(self, "extract", e)
            return None
        if value is None:
            return None
        return normalize_exact(str(value)) or None


@dataclass(frozen=True)
class FactoryTask(ExactTask):
    """A user's task object behind the :class:`Task` interface; ``exact`` fills in what it lacks."""

    kind: ClassVar[str] = "custom"

    inner: Any = None
    name: str = ""
    failures: dict[str, int] = field(default_factory=dict, compare=False)

    def messages(self, record: Record) -> list[Message]:
        if not hasattr(self.inner, "messages"):
            return super().messages(record)
        try:
            return list(self.inner.messages(record))
        except Exception as e:
            raise UserError(f"task.custom {self.name}: messages() failed on record {record.id}: {e!r}") from None

    def extract(self, text: str, record: Record | None = None, finish_reason: str | None = None) -> str | None:
        try:
            if _takes_record(self.inner.extract):
                value = self.inner.extract(text, record=record)
            else:
                value = self.inner.extract(text)
        except Exception as e:
            _complain(self, "extract", e)
            return None
        return None if value is None else str(value)

    def normalize_gold(self, record: Record) -> str:
        if not hasattr(self.inner, "normalize_gold"):
            return super().normalize_gold(record)
        try:
            return str(self.inner.normalize_gold(record))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"task.custom {self.name}: normalize_gold() failed on record {record.id}: {e!r}") from None

    def first_error(self, text: str, record: Record | None = None) -> int | None:
        if not hasattr(self.inner, "first_error"):
            return super().first_error(text, record)
        try:
            value = self.inner.first_error(text, record)
        except Exception as e:
            _complain(self, "first_error", e)
            return None
        return None if value is None else int(value)

    def check(self, prediction: str | None, record: Record) -> bool:
        if prediction is None:
            return False
        if hasattr(self.inner, "check"):
            try:
                return bool(self.inner.check(prediction, record))
            except Exception as e:
                _complain(self, "check", e)
                return False
        gold = self.normalize_gold(record)
        return prediction == gold or normalize_exact(prediction) == normalize_exact(gold)


def build_custom_task(cfg: TaskConfig) -> Task:
    """The task ``cfg.custom`` names, after checking that the config allows running user code."""
    spec = cfg.custom or ""
    if not spec:
        raise UserError("task.kind 'custom' needs task.custom: 'module:function'")
    if not cfg.allow_custom_code:
        raise UserError(
            f"task.custom '{spec}' runs your own Python code; set task.allow_custom_code: true to allow it"
        )
    fn = load_callable(spec)
    if inspect.isclass(fn) and issubclass(fn, Task):
        return fn(system_prompt=cfg.system_prompt, instruction=cfg.instruction)
    required, accepted = _positional(fn)
    if not inspect.isclass(fn) and required >= 2:
        return ExtractorTask(system_prompt=cfg.system_prompt, instruction=cfg.instruction, extractor=fn, name=spec)
    try:
        obj = fn(cfg) if accepted >= 1 else fn()
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"task.custom '{spec}': the factory raised {type(e).__name__}: {e}") from None
    if isinstance(obj, Task):
        return obj
    if not callable(getattr(obj, "extract", None)):
        raise UserError(
            f"task.custom '{spec}' must be a function fn(text, record) -> answer, or a factory returning an "
            f"object with an extract(text) method; it returned a {type(obj).__name__}"
        )
    return FactoryTask(system_prompt=cfg.system_prompt, instruction=cfg.instruction, inner=obj, name=spec)
