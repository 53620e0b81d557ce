"""Do eight devices train like one? Per-tensor distances after each step, and ReLU sign flips.

Trains `--steps` steps of the default experiment (its real data, its gradient clipping; dropout
and attention biases off, so that every parameter has one right answer) on one device, then
from the same state on the same batches with each strategy on all devices (8 simulated CPU
devices unless XLA_FLAGS says otherwise). After every step it reports the tensor farthest from
one device's, by ||a - b|| / ||b||, and how many feed-forward ReLU inputs of real tokens had
another sign than on one device in that step's forward pass: each such flip adds or removes
one token's share of one unit's gradient, far more than the float32 rounding of the sums.

  python benchmarks/parallel_equivalence.py                          # seed 0, the table
  python benchmarks/parallel_equivalence.py --seeds 0,1,2 --json
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxformer import config as config_lib  # noqa: E402
from jaxformer.data import pipeline  # noqa: E402
from jaxformer.train import jax_internals, parallel  # noqa: E402
from jaxformer.train import state as state_lib  # noqa: E402

import common  # noqa: E402

STRATEGIES = {"mesh": {}, "pmap": {"parallel.strategy": "pmap"}, "fsdp2": {"parallel.fsdp": 2},
              "fsdp4": {"parallel.fsdp": 4}, "fsdp8": {"parallel.fsdp": 8}}


def experiment(seed: int) -> ml_collections.ConfigDict:
  """The default experiment with dropout and attention biases off (mutable: prepare_data
  points its data_dir at the shared datasets)."""
  return ml_collections.ConfigDict(config_lib.load_config(
      "default", {"model.dropout_rate": "0.0", "model.attention_bias": "False",
                  "train.seed": str(seed)}))


def with_strategy(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  variant = config.copy_and_resolve_references()
  for key, value in STRATEGIES[name].items():
    section, field = key.split(".")
    variant[section][field] = value
  return variant


def train_batches(config, workdir: str, steps: int) -> list[dict[str, np.ndarray]]:
  """The first `steps` batches the training loop of one process reads."""
  tokenizer = common.prepare_data(config, workdir)
  batches = pipeline.make_train_iterator(config, tokenizer, config.data.data_dir,
                                         process_index=0, process_count=1)
  taken = [next(batches) for _ in range(steps)]
  batches.close()
  return taken


def trajectory(config, devices, initial, batches) -> list:
  """The host states before every step and after the last one (len(batches) + 1)."""
  strategy = parallel.make_strategy(config, devices)
  states, state = [initial], strategy.place_state(initial)
  for batch in batches:
    state, _ = strategy.train_step(state, strategy.shard_batch(batch))
    states.append(strategy.state_to_host(state))
  return states


def relu_inputs(config):
  """params, batch -> the feed-forward ReLU inputs of the real tokens, one flat array.

  Computed on one device for any parameters: a row's forward pass is the same bit for bit on
  every device layout, so these are the values each run's own step saw.
  """
  model = state_lib.make_model(config)

  @jax.jit
  def inputs(params, batch):
    _, captured = model.apply(
        {"params": params}, batch["inputs"], batch["targets"],
        inputs_positions=batch["inputs_positions"], targets_positions=batch["targets_positions"],
        inputs_segment_ids=batch["inputs_segment_ids"],
        targets_segment_ids=batch["targets_segment_ids"], deterministic=True,
        capture_intermediates=lambda module, _: module.name == "inner", mutable="intermediates")
    return captured["intermediates"]

  def real_token_inputs(params, batch):
    real = {"encoder": batch["inputs"] != 0, "decoder": batch["targets"] != 0}
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(inputs(params, batch)))
    return np.concatenate([np.ravel(x[real[path[0].key]]) for path, x in leaves
                           if "feed_forward" in jax.tree_util.keystr(path)])
  return real_token_inputs


def worst_tensor(a, b) -> tuple[str, float]:
  """(path, ||a - b|| / ||b||) of the tensor of `a` farthest from its counterpart in `b`."""
  errors = jax.tree.map(
      lambda x, y: float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12)), a, b)
  path, value = max(jax.tree_util.tree_leaves_with_path(errors), key=lambda kv: kv[1])
  return jax.tree_util.keystr(path), value


def measure_seed(seed: int, workdir: str, steps: int, names: list[str]) -> list[dict]:
  """One row per strategy and step: the worst tensor and the ReLU sign flips of that step."""
  config = experiment(seed)
  batches = train_batches(config, workdir, steps)   # (sets config.data.data_dir)
  one = jax.devices()[:1]
  strategy = parallel.make_strategy(config, one)
  initial = strategy.state_to_host(strategy.init_state(jax.random.key(seed)))
  reference = trajectory(config, one, initial, batches)
  relu = relu_inputs(config)
  rows = []
  for name in names:
    states = trajectory(with_strategy(config, name), None, initial, batches)
    for step in range(1, steps + 1):
      want = relu(reference[step - 1].params, batches[step - 1])
      got = relu(states[step - 1].params, batches[step - 1])
      path, error = worst_tensor(states[step].params, reference[step].params)
      rows.append({"seed": seed, "strategy": name, "step": step, "worst_tensor": path,
                   "relative_l2": error, "relu_sign_flips": int(np.sum((want > 0) != (got > 0)))})
  return rows


def print_tables(report: dict) -> None:
  print(f"{report['devices']} devices against 1; default experiment, dropout and attention "
        "biases off")
  print("| seed | strategy | step | ReLU sign flips in the step | worst tensor | relative L2 |")
  print("|---:|---|---:|---:|---|---:|")
  for row in report["rows"]:
    print(f"| {row['seed']} | {row['strategy']} | {row['step']} | {row['relu_sign_flips']} | "
          f"`{row['worst_tensor']}` | {row['relative_l2']:.2g} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0", help="train.seed values, comma-separated")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--strategies", default=",".join(STRATEGIES),
                      help=f"some of {', '.join(STRATEGIES)}")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "jaxformer_equivalence"),
                      help="where the vocabulary and the datasets are made once")
  parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")
  args = parser.parse_args()
  jax_internals.install()
  os.makedirs(args.workdir, exist_ok=True)
  rows = [row for seed in map(int, args.seeds.split(","))
          for row in measure_seed(seed, args.workdir, args.steps, args.strategies.split(","))]
  common.print_report({"devices": jax.device_count(), "rows": rows}, args.json, print_tables)


if __name__ == "__main__":
  main()
