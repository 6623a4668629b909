"""Config files shared by `hpcfed run` and `hpcfed align`: YAML reading, ``--set`` overrides, and
validation errors as one line that names the key (or file) and what is allowed."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from hpcfed.errors import HpcfedError

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty for an empty file)."""
    file = Path(path)
    if not file.is_file():
        raise HpcfedError(f"config error: file '{path}' not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise HpcfedError(f"config error: {path}{where}: YAML syntax error: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise HpcfedError(f"config error: cannot read '{path}': {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HpcfedError(f"config error: {path}: the top level must be a mapping of keys (got {type(data).__name__})")
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a raw config (the value parsed as YAML); integer parts index lists."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise HpcfedError(f"config error: --set '{item}': expected KEY=VALUE, e.g. train.lr=0.1")
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise HpcfedError(f"config error: --set {key}: '{part}' is not an index below {len(node)}")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
            if depth < len(parts) - 1:
                node.setdefault(part, {})
        else:
            raise HpcfedError(f"config error: --set {key}: '{parts[depth - 1]}' is a value, not a section")
        if depth == len(parts) - 1:
            node[index] = value
        else:
            node = node[index]


def validate(model: type[M], raw: dict[str, Any]) -> M:
    """``model`` from a raw mapping; the first problem becomes one HpcfedError line."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise HpcfedError(_describe(err, model)) from None
    except HpcfedError as err:   # a section's own range check (e.g. compression.bits)
        raise HpcfedError(f"config error: {err}") from None


def _fields(section: Any) -> dict[str, Any]:
    """Field name -> type of a pydantic model or (pydantic) dataclass."""
    if dataclasses.is_dataclass(section):
        return {f.name: f.type for f in dataclasses.fields(section)}
    if isinstance(section, type) and issubclass(section, BaseModel):
        return {name: field.annotation for name, field in section.model_fields.items()}
    return {}


def _section_at(root: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The section type that owns the key at ``loc``; list indices step into the item type."""
    section: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = _fields(section).get(str(part))
        args = typing.get_args(annotation)
        section = args[0] if args and isinstance(args[0], type) else annotation
    return section


def _describe(err: ValidationError, root: type[BaseModel]) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc)
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        allowed = ", ".join(_fields(_section_at(root, loc)))
        return f"config error: unknown key '{key}' (allowed here: {allowed})"
    message = str(first["msg"]).removeprefix("Value error, ")
    if key and message.split(":", 1)[0].startswith(key):  # a validator that names its own key
        return f"config error: {message}"
    shown = first.get("input")
    got = "" if isinstance(shown, (dict, list)) or first["type"] == "missing" else f" (got {shown!r})"
    return f"config error: {key or 'config'}: {message}{got}"
