"""The config reference: a markdown table generated from the models' field descriptions, embedded in
README.md between ``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->``
(``python -m orpo_distill.config [README.md]`` refreshes it; a test checks it is current).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .schema import RunConfig


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    text = re.sub(r"[\w.]*\.PhiRamp", "{linear: [float, float]}", text)
    return text.replace("<class '", "").replace("'>", "")


def config_reference() -> str:
    """The config reference as a markdown table, generated from the models (README.md embeds it)."""
    lines = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]

    def walk(obj: BaseModel, prefix: str) -> None:
        for name, f in type(obj).model_fields.items():
            key = f.alias or name
            value = getattr(obj, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{key}.")
                continue
            shown = "" if value is None else f"`{value}`"
            typ = _type_name(f.annotation).replace("|", "\\|")
            meaning = f.description or ""
            lines.append(f"| `{prefix}{key}` | {typ} | {shown} | {meaning} |")

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
