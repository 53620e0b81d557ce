"""`jaxformer info`: parameter counts per module and the config keys; `--help`, `--version`."""

import importlib.metadata
import pathlib
import tomllib

import jax
import numpy as np
import pytest

from jaxformer import cli
from jaxformer import config as config_lib
from jaxformer.model.transformer import Transformer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _printed_counts(capsys, *args):
  assert cli.main(["info", *args]) == 0
  rows = [line.rsplit(None, 1) for line in capsys.readouterr().out.splitlines()]
  return {name: int(count.replace(",", "")) for name, count in rows}


def test_info_counts_every_parameter_of_the_experiment(capsys):
  counts = _printed_counts(capsys, "--config", "default", "--config.model.num_layers=3")
  config = config_lib.load_config("default", {"model.num_layers": "3"})
  ids = jax.ShapeDtypeStruct((1, 4), np.int32)
  shapes = jax.eval_shape(Transformer(config=config.model).init, jax.random.key(0), ids, ids)
  expected = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
  assert counts["total"] == expected
  # Three layers per stack, each with its own weights, and the parts add up to the whole.
  layers = [name for name in counts if name.startswith("encoder/layers_")]
  assert len(layers) == 3
  assert counts["encoder"] == sum(counts[name] for name in layers)
  top = [name for name in counts if "/" not in name and name != "total"]
  assert sum(counts[name] for name in top) == counts["total"]


def test_info_depth_one_lists_top_level_modules_only(capsys):
  counts = _printed_counts(capsys, "--config", "default", "--depth", "1")
  assert all("/" not in name for name in counts)
  assert {"encoder", "decoder", "total"} <= set(counts)


def _printed_keys(capsys, *args) -> dict[str, str]:
  assert cli.main(["info", "--keys", *args]) == 0
  return dict(line.split(" = ", 1) for line in capsys.readouterr().out.splitlines())


def test_info_keys_lists_the_schema(capsys):
  printed = _printed_keys(capsys)
  defaults = config_lib.flatten(config_lib.get_default_config())
  assert printed == {key: repr(value) for key, value in defaults.items()}


def test_info_keys_of_an_experiment_prints_its_resolved_values(capsys):
  printed = _printed_keys(capsys, "--config", "sort", "--config.train.steps=7")
  # sort.py builds on copy.py, which sets d_model 64; the override wins over both.
  assert printed["data.task"] == "'sort'  (default 'numbers')"
  assert printed["model.d_model"] == "64  (default 512)"
  assert printed["train.steps"] == "7  (default 100000)"
  assert printed["train.adam_b1"] == "0.9"  # Unchanged: no note.
  assert set(printed) == set(config_lib.flatten(config_lib.get_default_config()))
  # Overrides apply to the schema too, and are checked like any other.
  assert _printed_keys(capsys, "--config.train.steps=7")["train.steps"] == "7  (default 100000)"
  assert cli.main(["info", "--keys", "--config", "copy", "--config.train.steps=-1"]) == 2
  assert capsys.readouterr().err.splitlines() == ["error: train.steps=-1 must be positive"]


def test_train_help_names_the_overrides_and_where_the_keys_are_listed(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["train", "--help"])
  assert exit_.value.code == 0
  out = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog.
  assert "--config.KEY=VALUE" in out and "`jaxformer info --keys --config EXPERIMENT`" in out


def test_version_is_the_installed_one_or_else_pyproject_s(capsys, monkeypatch):
  with open(ROOT / "pyproject.toml", "rb") as f:
    expected = tomllib.load(f)["project"]["version"]
  with pytest.raises(SystemExit) as exit_:
    cli.main(["--version"])
  assert exit_.value.code == 0 and capsys.readouterr().out == f"jaxformer {expected}\n"

  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)
  monkeypatch.setattr(importlib.metadata, "version", not_installed)
  assert cli.version() == expected  # Read from the checkout's pyproject.toml.


def test_info_with_a_misspelt_key_is_one_line_and_status_2(capsys):
  assert cli.main(["info", "--config", "default", "--config.model.d_modle=4"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: unknown config key model.d_modle; did you mean model.d_model?"]
