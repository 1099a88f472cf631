"""Loaders for user data: GSM8K files, generic JSONL with a field map, and Hugging Face datasets.

Every problem with the input (bad JSON, a missing answer, an answer that is not one of the choices,
duplicate ids, bytes that are not UTF-8) stops the run here, before any teacher call costs money, with
a :class:`UserError` naming the file and line (or the dataset, split and row).

Field map: ``DatasetConfig.fields`` maps our names (``id``, ``question``, ``answer``, ``choices``) to the
source's; unmapped names are read as themselves. ``choices`` may be a list, or a mapping like ARC's
``{"label": [...], "text": [...]}``. For ``mcq`` the answer becomes a letter: a letter (``B``, ``(b)``)
is kept, a choice label (ARC's ``"1"``) or the text of a choice becomes its letter, and a JSON integer
is read as a 0-based index into the choices.

Choices that carry their own letters (``["A. 08:00", "B. 09:00"]``, as MedQA ships them) are stored
without them, since every prompt letters the choices itself; the rule (every choice lettered in order,
in one style) is :func:`orpo_distill.tasks.base.unletter_choices`. A gold answer may then still be
given as the lettered text ("A. 08:00").

One field map serves every file of the dataset: ``train_path``, ``eval_path`` (or ``path``) and both
Hugging Face splits are read with the same ``fields``, so the files must name their fields alike.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..config import DatasetConfig
from ..errors import UserError
from ..store import iter_jsonl
from ..records import Record
from ..tasks.base import unletter_choices
from .splits import cap, ensure_disjoint, question_id, split_by_fraction

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
OUR_FIELDS = ("id", "question", "answer", "choices")
GSM8K_SAMPLES = {"train": "gsm8k_train_sample.jsonl", "test": "gsm8k_test_sample.jsonl"}

_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:]?")
_GSM8K_FINAL = re.compile(r"####\s*(.*?)\s*$", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_CALC_NOTE = re.compile(r"<<[^<>]*>>")


# ---------------------------------------------------------------------------------------------
# reading JSONL


def read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", object)`` for each non-blank line; errors name the line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"dataset file {path} is a directory, not a file; name a .jsonl file in it"
                        " (a saved Hugging Face dataset folder is read with dataset.kind: hf)")
    return iter_jsonl(path, what="dataset file")


# ---------------------------------------------------------------------------------------------
# one row -> one record


def check_fields(fields: dict[str, str]) -> dict[str, str]:
    """The full map from our names to the source's; unknown names are a config error."""
    unknown = sorted(set(fields) - set(OUR_FIELDS))
    if unknown:
        raise UserError(f"dataset.fields: unknown name(s) {unknown}; the names are {', '.join(OUR_FIELDS)}")
    return {name: fields.get(name, name) for name in OUR_FIELDS}


def parse_choices(raw: Any, where: str) -> tuple[list[str] | None, list[str] | None]:
    """``(texts, labels)``: labels only for mappings like ``{"label": [...], "text": [...]}`` (ARC) or
    ``{"A": "...", "B": "..."}`` (MedQA's ``options``)."""
    if raw is None:
        return None, None
    labels = None
    if isinstance(raw, dict) and raw and "text" not in raw and all(isinstance(v, str) for v in raw.values()):
        labels = [str(k).strip() for k in raw]
        raw = {"text": list(raw.values()), "label": labels}
    if isinstance(raw, dict):
        if "text" not in raw:
            raise UserError(f"{where}: choices given as a mapping need a 'text' list (and optionally 'label')")
        texts, labels = raw["text"], raw.get("label")
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(texts)):
            raise UserError(f"{where}: choices 'label' must be a list as long as 'text'")
        raw = texts
        labels = None if labels is None else [str(x).strip() for x in labels]
    if not isinstance(raw, (list, tuple)) or any(isinstance(x, (dict, list)) for x in raw):
        raise UserError(f"{where}: choices must be a list of strings or a {{label, text}} mapping")
    if not raw:
        return None, None
    if len(raw) > len(LETTERS):
        raise UserError(f"{where}: {len(raw)} choices; at most {len(LETTERS)} are supported")
    return [str(x) for x in raw], labels


def mcq_letter(answer: Any, choices: list[str] | None, labels: list[str] | None, where: str,
               lettered: list[str] | None = None) -> str:
    """Normalise a multiple-choice answer to a letter, or say why it cannot be one. ``lettered``: the
    choices as the source wrote them, when that was with their own letters (matched as text too)."""
    n = len(choices) if choices else len(LETTERS)
    last = LETTERS[n - 1]
    if isinstance(answer, int) and not isinstance(answer, bool):
        if choices and 0 <= answer < n:
            return LETTERS[answer]
        raise UserError(f"{where}: answer index {answer} is out of range for {len(choices or [])} choices")
    text = str(answer).strip()
    if labels and text in labels:
        return LETTERS[labels.index(text)]
    m = _LETTER.fullmatch(text)
    if m and LETTERS.index(m.group(1).upper()) < n:
        return m.group(1).upper()
    if choices:
        for texts in (choices, lettered or []):
            stripped = [c.strip() for c in texts]
            if text in stripped:
                return LETTERS[stripped.index(text)]
            folded = [c.casefold() for c in stripped]
            if text.casefold() in folded:
                return LETTERS[folded.index(text.casefold())]
        raise UserError(
            f"{where}: answer {text!r} is neither a letter A-{last} nor the text of one of the {n} choices"
        )
    raise UserError(f"{where}: answer {text!r} is not a letter; mcq rows without choices need a letter answer")


def answer_text(raw: Any, where: str, field: str) -> str:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise UserError(f"{where}: missing answer (field '{field}')")
    if isinstance(raw, bool):
        return "yes" if raw else "no"
    if isinstance(raw, (dict, list)):
        raise UserError(f"{where}: answer (field '{field}') must be a string or a number")
    return str(raw).strip()


def parse_row(
    row: dict[str, Any], fmap: dict[str, str], task_kind: str, where: str, default_id: str | None = None
) -> Record:
    """Map one source row to a record. ``default_id`` is used when the row has no id (else a hash of
    the question text, which stays the same when the file is reordered)."""
    question = row.get(fmap["question"])
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: missing question (field '{fmap['question']}')")
    source_choices, labels = parse_choices(row.get(fmap["choices"]), where)
    choices = unletter_choices(source_choices) if source_choices else None
    lettered = source_choices if choices != source_choices else None
    raw_answer = row.get(fmap["answer"])
    if task_kind == "mcq":
        if raw_answer is None or (isinstance(raw_answer, str) and not raw_answer.strip()):
            raise UserError(f"{where}: missing answer (field '{fmap['answer']}')")
        answer = mcq_letter(raw_answer, choices, labels, where, lettered)
    else:
        answer = answer_text(raw_answer, where, fmap["answer"])
    rid = row.get(fmap["id"])
    meta: dict[str, Any] = {"source": where}
    if lettered:
        meta["choices_unlettered"] = True  # the source's choices carried their own letters, removed
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        rid = default_id or question_id(question)
        meta["id_from"] = "row index" if default_id else "question text"
    return Record(id=str(rid).strip(), question=question.strip(), answer=answer,
                  choices=tuple(choices) if choices else None, meta=meta)


def unique(records: Iterable[Record]) -> list[Record]:
    """Refuse two rows with the same id: traces and predictions are keyed by id."""
    seen: dict[str, Record] = {}
    out = []
    for r in records:
        if r.id in seen:
            hint = ""
            if r.meta.get("id_from") == "question text":
                hint = " (the id is derived from the question text: give rows an id field or drop the duplicate)"
            raise UserError(
                f"{r.meta['source']}: duplicate id '{r.id}', first seen at {seen[r.id].meta['source']}{hint}"
            )
        seen[r.id] = r
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# splitting and capping, shared by the file loaders


def finish(cfg: DatasetConfig, train: list[Record], eval_: list[Record] | None) -> tuple[list[Record], list[Record]]:
    """Split by ``eval_fraction`` when there is no separate eval data, check disjointness, apply caps."""
    if eval_ is None:
        train, eval_ = split_by_fraction(train, cfg.eval_fraction, cfg.seed)
    ensure_disjoint(train, eval_)
    return cap(train, cfg.train_size), cap(eval_, cfg.eval_size)


def resolve_files(cfg: DatasetConfig) -> tuple[Path | None, Path | None]:
    """``train_path`` (or ``path``) for training, ``eval_path`` for evaluation when given."""
    train = cfg.train_path or cfg.path
    return (Path(train).expanduser() if train else None, Path(cfg.eval_path).expanduser() if cfg.eval_path else None)


def split_labels(cfg: DatasetConfig) -> tuple[str, str]:
    if cfg.train_split != cfg.eval_split:
        return cfg.train_split, cfg.eval_split
    return "train", "eval"


# ---------------------------------------------------------------------------------------------
# jsonl


def read_records(path: Path, fmap: dict[str, str], task_kind: str) -> list[Record]:
    return unique(parse_row(row, fmap, task_kind, where) for where, row in read_jsonl(path))


def load_jsonl(cfg: DatasetConfig, task_kind: str = "mcq") -> tuple[list[Record], list[Record]]:
    """Generic JSONL: one object a line, fields named by ``cfg.fields``."""
    fmap = check_fields(cfg.fields)
    train_file, eval_file = resolve_files(cfg)
    if train_file is None:
        raise UserError("dataset.path: the jsonl dataset needs a file (dataset.path or dataset.train_path)")
    train = read_records(train_file, fmap, task_kind)
    eval_ = read_records(eval_file, fmap, task_kind) if eval_file else None
    return finish(cfg, train, eval_)


# ---------------------------------------------------------------------------------------------
# gsm8k


def gsm8k_row(row: dict[str, Any], where: str, rid: str) -> Record:
    """A GSM8K row: the gold number follows ``####``; the solution keeps its text, minus ``<<a=b>>`` notes."""
    question, solution = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: missing question (field 'question')")
    if not isinstance(solution, str) or not solution.strip():
        raise UserError(f"{where}: missing answer (field 'answer')")
    m = _GSM8K_FINAL.search(solution)
    if not m:
        raise UserError(f"{where}: the answer has no '#### N' final line")
    number = m.group(1).replace(",", "").replace("$", "").strip()
    if not _NUMBER.fullmatch(number):
        raise UserError(f"{where}: the value after '####' is not a number: {m.group(1)!r}")
    text = _CALC_NOTE.sub("", solution[: m.start()]).strip()
    return Record(id=rid, question=question.strip(), answer=number, meta={"solution": text, "source": where})


def read_gsm8k(path: Path, label: str) -> list[Record]:
    rows = []
    index = 0
    for where, row in read_jsonl(path):
        rows.append(gsm8k_row(row, where, f"gsm8k-{label}-{index}"))
        index += 1
    return rows


def _label(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", path.stem) or "data"


def load_gsm8k(cfg: DatasetConfig, task_kind: str = "numeric") -> tuple[list[Record], list[Record]]:
    """GSM8K-format files; with no path, the sample shipped in the package (200 train, 100 test rows).

    Ids are ``gsm8k-<split>-<row index>``: the split is ``train_split``/``eval_split`` for separate
    files, the file name for a single file (split by ``eval_fraction``).
    """
    if task_kind in ("mcq", "yesno"):
        raise UserError(f"dataset.kind 'gsm8k' has numeric answers; set task.kind: numeric (got '{task_kind}')")
    train_file, eval_file = resolve_files(cfg)
    if train_file is None:
        with ExitStack() as stack:
            root = resources.files("orpo_distill") / "data"
            files = {k: stack.enter_context(resources.as_file(root / name)) for k, name in GSM8K_SAMPLES.items()}
            return finish(cfg, read_gsm8k(files["train"], "train"), read_gsm8k(files["test"], "test"))
    if eval_file is None:
        return finish(cfg, read_gsm8k(train_file, _label(train_file)), None)
    train_label, eval_label = split_labels(cfg)
    return finish(cfg, read_gsm8k(train_file, train_label), read_gsm8k(eval_file, eval_label))


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``save_to_disk`` (a Dataset or a DatasetDict), as opposed to raw data files."""
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def open_hf(cfg: DatasetConfig) -> Any:
    """``load_from_disk`` for a saved folder, else ``load_dataset(path, hf_config)`` (Hub id or data folder)."""
    if not cfg.path:
        raise UserError("dataset.path: the hf dataset needs a Hub id or a local folder")
    import datasets  # slow to import; only this loader needs it

    local = Path(cfg.path).expanduser()
    try:
        if is_saved_dataset(local):
            return datasets.load_from_disk(str(local))
        return datasets.load_dataset(str(local) if local.is_dir() else cfg.path, cfg.hf_config)
    except Exception as e:  # noqa: BLE001 - any failure here is the user's path, config or network
        cfg_note = f" (hf_config {cfg.hf_config!r})" if cfg.hf_config else ""
        raise UserError(f"dataset.path: could not load {cfg.path!r}{cfg_note}: {type(e).__name__}: {e}") from None


def hf_records(ds: Any, name: str, split: str, fmap: dict[str, str], task_kind: str, limit: int | None) -> list[Record]:
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    return unique(
        parse_row(dict(row), fmap, task_kind, f"{name}[{split}] row {i}", default_id=f"{split}-{i}")
        for i, row in enumerate(ds)
    )


def load_hf(cfg: DatasetConfig, task_kind: str = "mcq") -> tuple[list[Record], list[Record]]:
    """Any Hugging Face dataset, from the Hub or a local folder, with the field map.

    Splits ``train_split`` and ``eval_split``; a dataset without the eval split (or a single saved
    Dataset) is split by ``eval_fraction``. Rows without an id get ``<split>-<row index>``.
    """
    fmap = check_fields(cfg.fields)
    ds = open_hf(cfg)
    name = cfg.path
    if not hasattr(ds, "keys"):  # a single Dataset
        return finish(cfg, hf_records(ds, name, "all", fmap, task_kind, None), None)
    available = list(ds.keys())
    if cfg.train_split not in ds:
        raise UserError(f"dataset.train_split: {name!r} has no split {cfg.train_split!r} (it has {available})")
    if cfg.eval_split not in ds or cfg.eval_split == cfg.train_split:
        return finish(cfg, hf_records(ds[cfg.train_split], name, cfg.train_split, fmap, task_kind, None), None)
    train = hf_records(ds[cfg.train_split], name, cfg.train_split, fmap, task_kind, cfg.train_size)
    eval_ = hf_records(ds[cfg.eval_split], name, cfg.eval_split, fmap, task_kind, cfg.eval_size)
    return finish(cfg, train, eval_)
