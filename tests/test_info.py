"""`jaxformer info`: parameter counts per module and the list of config keys."""

import jax
import numpy as np

from jaxformer import cli
from jaxformer import config as config_lib
from jaxformer.model.transformer import Transformer


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


def test_info_keys_lists_the_schema(capsys):
  assert cli.main(["info", "--keys"]) == 0
  out = capsys.readouterr().out
  for key in config_lib.flatten(config_lib.get_default_config()):
    assert f"{key} = " in out


def test_info_with_a_misspelt_key_is_one_line_and_status_2(capsys):
  assert cli.main(["info", "--config", "default", "--config.model.d_modle=4"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: unknown config key model.d_modle; did you mean model.d_model?"]
