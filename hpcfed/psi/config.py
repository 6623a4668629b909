"""The `hpcfed align` config: pydantic models, YAML loading, ``--set`` overrides.

Every problem becomes one :class:`HpcfedError` line naming the key (or file) and
what is allowed. Relative paths resolve against the config file's folder, so a
config and its id files can move together.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpcfed.errors import HpcfedError


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PartySource(Section):
    """Where one party's identifiers live: a text file, a CSV column or an HDF5 dataset."""

    path: Path
    column: str | None = Field(None, description="CSV: header name of the id column")
    dataset: str | None = Field(None, description="HDF5: path of a 1-D dataset of strings or integers")
    test_share: str | None = Field(
        None, description="TESTS ONLY: fix this party's shuffle share (64 hex digits) instead of drawing it")

    @property
    def kind(self) -> Literal["text", "csv", "hdf5"]:
        return "csv" if self.column else "hdf5" if self.dataset else "text"

    @field_validator("test_share")
    @classmethod
    def _hex32(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hex digits (32 bytes)")
        return value

    @model_validator(mode="after")
    def _one_format(self) -> PartySource:
        if self.column and self.dataset:
            raise ValueError("set either column (CSV) or dataset (HDF5), not both")
        suffix = self.path.suffix.lower()
        if suffix == ".csv" and not self.column:
            raise ValueError(f"{self.path.name} looks like CSV: set column (the header name of the id column)")
        if suffix in (".h5", ".hdf5") and not self.dataset:
            raise ValueError(f"{self.path.name} looks like HDF5: set dataset (the dataset that holds the ids)")
        return self


class Normalize(Section):
    strip: bool = True
    lower: bool = False


class Output(Section):
    dir: Path = Path("runs/align")


class AlignConfig(Section):
    parties: list[PartySource] = Field(min_length=2)
    normalize: Normalize = Normalize()
    mode: Literal["intersection", "cardinality"] = "intersection"
    ranks_per_party: int = Field(1, ge=1)
    output: Output = Output()

    def to_yaml(self) -> str:
        """The resolved config as YAML text (stored in every output file)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_align_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> AlignConfig:
    """Read the YAML file, apply ``KEY=VALUE`` overrides, validate, resolve relative paths."""
    raw = _read_yaml(Path(path))
    for item in overrides:
        apply_override(raw, item)
    try:
        config = AlignConfig.model_validate(raw)
    except ValidationError as err:
        raise HpcfedError(_describe(err)) from None
    base = Path(path).resolve().parent
    return config.model_copy(update={
        "parties": [p.model_copy(update={"path": base / p.path}) for p in config.parties],
        "output": config.output.model_copy(update={"dir": base / config.output.dir}),
    })


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HpcfedError(f"config error: file '{path}' not found") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise HpcfedError(f"config error: {path}{where}: YAML syntax error: {getattr(err, 'problem', err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise HpcfedError(f"config error: cannot read '{path}': {err}") from None
    if not isinstance(data, dict):
        raise HpcfedError(f"config error: {path}: the top level must be a mapping with key 'parties'")
    return data


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in the raw config (value parsed as YAML); integer parts index lists."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise HpcfedError(f"config error: --set '{item}': expected KEY=VALUE, e.g. mode=cardinality")
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise HpcfedError(f"config error: --set {key}: '{part}' is not an index below {len(node)}")
            index: Any = int(part)
        elif isinstance(node, dict):
            index = part
            if not last:
                node.setdefault(part, {})
        else:
            raise HpcfedError(f"config error: --set {key}: '{parts[depth - 1]}' is a value, not a section")
        if last:
            node[index] = yaml.safe_load(text) if text.strip() else text
        else:
            node = node[index]


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that owns the key at ``loc`` (list indices step into the item type)."""
    model: Any = AlignConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        args = typing.get_args(annotation)
        model = args[0] if args and isinstance(args[0], type) else annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return model


def _describe(err: ValidationError) -> str:
    """One line for the first validation problem: key, what is wrong, what is allowed."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "config"
    if first["type"] == "extra_forbidden":
        owner = _model_at(loc)
        allowed = ", ".join(owner.model_fields) if owner else ""
        return f"config error: unknown key '{key}' (allowed here: {allowed})"
    message = str(first["msg"]).removeprefix("Value error, ")
    shown = first.get("input")
    got = "" if isinstance(shown, (dict, list)) or first["type"] == "missing" else f" (got {shown!r})"
    return f"config error: {key}: {message}{got}"
