"""The config reference: a markdown table generated from the models' field descriptions, embedded in
docs/configuration.md between ``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->``
(``python -m orpo_distill.config [docs/configuration.md]`` refreshes it; a test checks it is current).
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .generators import BY_KIND, KIND_HELP, KINDS
from .schema import RunConfig


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # "A | B", not "Union[A, B]"
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    text = str(annotation).replace("typing.", "")
    text = text.replace("NoneType", "None")
    text = re.sub(r"[\w.]*\.PhiRamp", "{linear: [float, float]}", text)
    return text.replace("<class '", "").replace("'>", "")


def _row(key: str, annotation: Any, value: Any, meaning: str) -> str:
    shown = "" if value is None else value if value == "*required*" else f"`{value}`"
    typ = _type_name(annotation).replace("|", "\\|")
    return f"| `{key}` | {typ} | {shown} | {meaning} |"


def _generator_rows(section: BaseModel, prefix: str) -> list[str]:
    """A teacher or student section: ``kind``, then every kind's fields once, each saying which kinds
    take it (the section's default where its kind has the field, else the field's own; *required* when
    it has none), then ``sampling``."""
    lines = [_row(f"{prefix}kind", f"Literal{list(KINDS)}", section.kind, KIND_HELP)]
    names = list(dict.fromkeys(n for model in BY_KIND.values() for n in model.model_fields))
    shared = [n for n in names if all(n in model.model_fields for model in BY_KIND.values())]
    for name in [n for n in names if n not in shared] + shared:  # each kind's own fields, then the common ones
        if name in ("kind", "sampling"):
            continue
        owners = [k for k, model in BY_KIND.items() if name in model.model_fields]
        f = BY_KIND[owners[0]].model_fields[name]
        if name in type(section).model_fields:
            value = getattr(section, name)
        else:
            value = "*required*" if f.is_required() else f.default
        said: dict[str, list[str]] = {}  # one description, the kinds that give it
        for k in owners:
            said.setdefault(BY_KIND[k].model_fields[name].description or "", []).append(k)
        meaning = "; ".join(text if len(owners) == len(KINDS) else f"{', '.join(kinds)}: {text}"
                            for text, kinds in said.items())
        lines.append(_row(f"{prefix}{name}", f.annotation, value, meaning))
    return lines


def config_reference() -> str:
    """The config reference as a markdown table, generated from the models (docs/configuration.md embeds it)."""
    lines = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(obj: BaseModel, prefix: str) -> None:
        for name, f in type(obj).model_fields.items():
            key = f.alias or name
            value = getattr(obj, name)
            if type(value) in BY_KIND.values():
                lines.extend(_generator_rows(value, f"{prefix}{key}."))
                walk(value.sampling, f"{prefix}{key}.sampling.")
            elif isinstance(value, BaseModel):
                walk(value, f"{prefix}{key}.")
            else:
                lines.append(_row(f"{prefix}{key}", f.annotation, value, f.description or ""))

    walk(RunConfig(), "")
    return "\n".join(lines) + "\n"


def update_readme(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    new = re.sub(
        r"(<!-- config-reference:start -->\n).*?(<!-- config-reference:end -->)",
        lambda m: m.group(1) + config_reference() + m.group(2),
        text,
        flags=re.S,
    )
    path.write_text(new, encoding="utf-8")
