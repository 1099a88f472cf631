"""Reading a configuration: YAML in (duplicate keys refused), ``--set a.b=c`` overrides, one
:class:`UserError` naming each wrong field by its dotted path, and the resolved config out.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import UserError
from .generators import BY_KIND, KINDS
from .schema import RunConfig


def _generator_error(loc: list[str], e: dict[str, Any], msg: str) -> tuple[list[str], str]:
    """A generator section's error in its own words: the kind's tag left out of the path, a missing field
    said as what the kind needs, an unknown kind said as the kinds there are."""
    if e["type"] == "generator_kind":
        got = e["input"].get("kind") if isinstance(e["input"], dict) else e["input"]
        return loc + ["kind"], f"must be one of {', '.join(KINDS)} (got {got!r})"
    if len(loc) < 2 or loc[1] not in BY_KIND:
        return loc, msg
    kind, rest = loc[1], loc[:1] + loc[2:]
    if e["type"] == "missing" and len(rest) == 2:
        field = BY_KIND[kind].model_fields[rest[1]]
        return rest, f"generator kind '{kind}' needs '{rest[1]}' ({field.description})"
    if e["type"] == "extra_forbidden" and len(rest) == 2:
        owners = [k for k, model in BY_KIND.items() if rest[1] in model.model_fields]
        if owners:
            return rest, f"not a field of generator kind '{kind}' (it belongs to kind {' or '.join(owners)})"
    return rest, msg


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not str(p).startswith("function-")]
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see docs/configuration.md)"
        if loc and loc[0] in ("teacher", "student"):
            loc, msg = _generator_error(loc, e, msg)
        inp = e.get("input")
        shown = e["type"] in ("extra_forbidden", "missing") or isinstance(inp, dict)
        got = "" if shown else f" (got {inp!r})"
        lines.append(f"  {'.'.join(loc) or '<root>'}: {msg}{got}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], value).

    The value is read as YAML when it is a number, a boolean, null, a quoted string or a flow list or
    mapping (``0.25``, ``true``, ``[0.1, 0.5]``, ``{question: q}``); anything else is taken literally,
    so ``task.system_prompt=Answer: briefly`` stays a string rather than becoming a mapping, and
    ``task.instruction=Use #tags`` keeps what YAML would drop as a comment.
    """
    if "=" not in text:
        raise UserError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise UserError(f"--set expects key.path=value, got {text!r}")
    path, raw = key.strip().split("."), raw.strip()
    if not raw:
        return path, ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return path, raw
    if raw[0] in "[{\"'" or value is None or isinstance(value, (bool, int, float)):
        return path, value
    return path, raw


def set_dotted(data: dict[str, Any], dotted: str | list[str], value: Any, what: str | None = None) -> None:
    """``set_dotted(d, "train.phi", 0.0)`` sets ``d["train"]["phi"]`` in place, creating missing (or null)
    sections; a key on the way that holds a value rather than a section is a UserError naming ``what``
    (default: the dotted key)."""
    path = dotted.split(".") if isinstance(dotted, str) else list(dotted)
    node = data
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"{what or '.'.join(path)}: '{part}' is not a section")
        node = nxt
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``data`` with each ``--set key.path=value`` applied, in order (``data`` itself is left alone)."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(data, path, value, f"--set {text}")
    return data


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives one key twice (PyYAML alone silently keeps the last)."""

    def __init__(self, key: str, first_line: int, second_line: int) -> None:
        super().__init__(f"key {key!r} given twice, on line {first_line} and line {second_line}")
        self.key, self.first_line, self.second_line = key, first_line, second_line


def _check_unique_keys(node: yaml.Node, path: str = "") -> None:
    """Raise :class:`DuplicateKeyError` for the first mapping in ``node`` that gives a key twice; the key
    is named by its dotted path (``train.phi``). A key after a merge (``<<: *base``) overrides the
    merged one, as YAML means it to, and is no duplicate."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            dotted = f"{path}.{name}" if path and name is not None else name
            if name is not None:
                line = key_node.start_mark.line + 1
                if name in seen:
                    raise DuplicateKeyError(str(dotted), seen[name], line)
                seen[name] = line
            _check_unique_keys(value_node, str(dotted) if dotted is not None else path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]")


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (:class:`DuplicateKeyError`)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {p} is a directory, not a file")
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except DuplicateKeyError as e:
        raise UserError(f"{p}: line {e.second_line}: key {e.key!r} given twice (first on line {e.first_line}); "
                        "YAML would silently keep the second, so remove one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{p}:{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def build_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_errors(e, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " with --set " + " ".join(overrides)
    return build_config(data, source)


def resolved_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data. It holds environment-variable *names*, never key values."""
    return cfg.model_dump(mode="json", by_alias=True)
