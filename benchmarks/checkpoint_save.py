"""What a checkpoint costs the training loop: the checksums and a whole save, paper-base state.

The state is the paper's base model's TrainState (wmt14_en_de_base: float32 parameters and
Adam's two moments) on the first device. This times `checkpoint.array_checksums` of it on the
device (jit, as `Checkpointer.save` computes them; the first call compiles) and in host memory
(NumPy, as for a state the pmap strategy saves from the host), then SAVES saves of it with a
`Checkpointer`: how long `save()` holds the loop (the arrays copied off the device, the
checksums) and how long until the step is on disk. Run it on an older tree (e.g. `git archive`
of the commit before the checksums) for the "before" figures: the checksum rows are left out
there.

  python benchmarks/checkpoint_save.py            # the table
  python benchmarks/checkpoint_save.py --json     # one JSON object instead
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import grain
import jax

from jaxformer import checkpoint
from jaxformer import config as config_lib
from jaxformer.train import jax_internals
from jaxformer.train import state as state_lib

import common

EXPERIMENT = "wmt14_en_de_base"
CHECKSUM_CALLS = 5  # timed calls after the first.
SAVES = 4


def base_state():
  config = config_lib.load_config(EXPERIMENT, {})
  state = jax.jit(lambda rng: state_lib.init_state(config, rng))(jax.random.key(0))
  return jax.block_until_ready(state)


def time_saves(state) -> tuple[list[float], list[float]]:
  """Seconds until each `save()` returned, and until its step was on disk."""
  iterator = iter(grain.MapDataset.range(SAVES * 4).batch(4).to_iter_dataset())
  returned, written = [], []
  with tempfile.TemporaryDirectory() as workdir:
    with checkpoint.Checkpointer(workdir, every_steps=1, keep=2) as ckpt:
      for step in range(1, SAVES + 1):
        next(iterator)
        start = time.perf_counter()
        ckpt.save(step, state, iterator)
        returned.append(time.perf_counter() - start)
        ckpt.wait()
        written.append(time.perf_counter() - start)
  return returned, written


def measure() -> dict:
  state = base_state()
  leaves = jax.tree.leaves(state)
  report = {"experiment": EXPERIMENT, "arrays": len(leaves),
            "mib": sum(x.nbytes for x in leaves) / 2**20,
            "params": sum(x.size for x in jax.tree.leaves(state.params)),
            "load_before": os.getloadavg()[0]}
  if hasattr(checkpoint, "array_checksums"):  # Absent in code older than the checksums.
    timing, _ = common.time_call(lambda: checkpoint.array_checksums(state), CHECKSUM_CALLS)
    report["checksum_device"] = {"first": timing.first, "best": timing.best,
                                 "median": timing.median}
    host = jax.device_get(state)
    times, _ = common.time_calls(lambda: checkpoint.array_checksums(host), CHECKSUM_CALLS)
    report["checksum_host"] = {"best": min(times), "median": statistics.median(times)}
  report["save_returned"], report["save_written"] = time_saves(state)
  report["load_after"] = os.getloadavg()[0]
  return report


def print_tables(report: dict) -> None:
  print(f"{report['experiment']}: {report['params'] / 1e6:.1f}M params, {report['arrays']} "
        f"arrays, {report['mib']:.0f} MiB in all; load {report['load_before']:.1f} -> "
        f"{report['load_after']:.1f}")
  print("| | first | best | median |\n|---|---:|---:|---:|")
  if "checksum_device" in report:
    d, h = report["checksum_device"], report["checksum_host"]
    print(f"| checksums, on the device (jit) | {d['first']:.2f} s | {d['best']:.2f} s | "
          f"{d['median']:.2f} s |")
    print(f"| checksums, host NumPy | | {h['best']:.2f} s | {h['median']:.2f} s |")
  for name, key in (("save() returns", "save_returned"), ("step on disk", "save_written")):
    times = report[key]
    print(f"| {name} | {times[0]:.2f} s | {min(times[1:]):.2f} s | "
          f"{statistics.median(times[1:]):.2f} s |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")
  args = parser.parse_args()
  jax_internals.install()
  common.print_report(measure(), args.json, print_tables)


if __name__ == "__main__":
  main()
