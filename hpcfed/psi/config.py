"""The `hpcfed align` config: pydantic models, YAML loading, ``--set`` overrides.

Every problem becomes one :class:`HpcfedError` line naming the key (or file) and
what is allowed. Relative paths resolve against the config file's folder, so a
config and its id files can move together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from hpcfed.configfile import Section, apply_override, read_yaml, validate


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
    raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    config = validate(AlignConfig, raw)
    base = Path(path).resolve().parent
    return config.model_copy(update={
        "parties": [p.model_copy(update={"path": base / p.path}) for p in config.parties],
        "output": config.output.model_copy(update={"dir": base / config.output.dir}),
    })
