"""Config schema: defaults, overrides, and one-line errors that name the key or file."""

from pathlib import Path

import pytest
import yaml

from hpcfed.config import Config, load_config
from hpcfed.errors import HpcfedError

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_file_spells_out_the_defaults():
    assert load_config(str(REPO / "configs" / "quickstart.yaml")) == Config()


def test_overrides_are_typed_from_yaml():
    cfg = load_config(None, ["train.lr=0.1", "model.name=mlp", "train.steps=7", "output.dir=x"])
    assert (cfg.train.lr, cfg.model.name, cfg.train.steps, cfg.output.dir) == (0.1, "mlp", 7, "x")


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config(None, ["train.lr=0.2"])
    assert Config.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("override, expected", [
    ("train.lr=-1", "train.lr"),
    ("train.lrr=1", "unknown key 'train.lrr' (allowed here: steps, batch_size, lr"),
    ("data.name=cifar", "data.name: Input should be 'digits', 'mnist1d', 'hdf5' or 'synthetic'"),
    ("model.hidden=abc", "model.hidden"),
    ("data.test_fraction=1.5", "data.test_fraction"),
    ("data.path=missing.h5", "data.path: only used with data.name 'hdf5'"),
    ("bogus=1", "unknown key 'bogus'"),
    ("train.lr", "--set 'train.lr': expected KEY=VALUE"),
])
def test_bad_values_give_one_line_naming_the_key(override, expected):
    with pytest.raises(HpcfedError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(HpcfedError, match="data.path: file 'nope.h5' not found"):
        load_config(None, ["data.name=hdf5", "data.path=nope.h5"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n  steps: [1\n")
    with pytest.raises(HpcfedError, match=r"bad.yaml line \d+ column \d+: YAML syntax error"):
        load_config(str(bad))


def test_missing_config_file_is_named():
    with pytest.raises(HpcfedError, match="file 'absent.yaml' not found"):
        load_config("absent.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(HpcfedError, match="top level must be a mapping"):
        load_config(str(bad))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    if path.name.startswith("align"):
        from hpcfed.psi.config import load_align_config

        load_align_config(str(path), [])
    elif path.name == "hdf5-data.yaml":   # names a file the README shows how to write
        with pytest.raises(HpcfedError, match="data.path: file 'data/digits.h5' not found"):
            load_config(str(path))
    else:
        load_config(str(path))
