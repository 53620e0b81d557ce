"""Does bfloat16 compute train the default task as well as float32? Two real runs, compared.

Trains the default experiment (experiments/default.py) twice with the training loop itself
(`jaxformer.train.loop.train_and_evaluate`): once with `model.dtype=float32`, once with
`model.dtype=bfloat16` (parameters, optimizer and loss stay float32 either way), from the same
seed, on the same data in the same order. Then it compares their validation exact match, over
every validation sentence, decoded as the experiment decodes (beam 4). bfloat16 passes when its
exact match is within `--tolerance` points (1) of float32's.

  python benchmarks/bf16_quality.py            # the default experiment as it is (600 steps)
  python benchmarks/bf16_quality.py --quick    # a smaller model (D=64, F=256), 200 steps
  python benchmarks/bf16_quality.py --json

tests/test_bf16_quality.py runs the same comparison at the size SIZES['test'] (less data, 150
steps).

Exits 0 when bfloat16 is within the tolerance, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from jaxformer import config as config_lib
from jaxformer.train import jax_internals

import common

DTYPES = ("float32", "bfloat16")
# Overrides of the default experiment per size; 'full' is the experiment as it is.
SIZES = {
    "full": {},
    "quick": {"model.d_model": 64, "model.d_ff": 256, "model.num_heads": 4,
              "train.steps": 200, "train.warmup_steps": 100},
    "test": {"model.d_model": 64, "model.d_ff": 256, "model.num_heads": 4,
             "train.steps": 150, "train.warmup_steps": 100, "data.num_train": 6000,
             "data.num_validation": 400, "data.num_test": 16,
             # No sample translations, so no attention image: 3-5 s a run, which the test needs not.
             "eval.num_samples": 0},
}


def make_config(dtype: str, size: str = "full"):
  """The default experiment at `size` (SIZES) with `model.dtype=dtype`, evaluated once."""
  config = config_lib.load_experiment("default")
  config.model.dtype = dtype
  for key, value in SIZES[size].items():
    section, name = key.split(".")
    config[section][name] = value
  # Evaluate once, at the end, decoding every validation sentence.
  config.train.eval_every_steps = config.train.steps
  config.checkpoint.every_steps = config.train.steps
  config.eval.bleu_examples = config.data.num_validation
  config_lib.validate(config)
  return config


def train(dtype: str, size: str, workdir: str) -> dict:
  """One run in a fresh directory under `workdir` (vocabulary and data shared); its result."""
  config = make_config(dtype, size)
  common.prepare_data(config, workdir)  # Made once, shared by both runs.
  run = common.train_fresh_run(config, workdir, prefix=f"{dtype}-")
  validation, last = run.validation, run.train_metrics[-1]
  return dict(dtype=dtype, steps=config.train.steps, seconds=run.seconds,
              exact_match=validation["exact_match"], bleu=validation["bleu"],
              validation_loss=validation["loss"], decoded=validation["decoded_examples"],
              final_train_loss=last["loss"], step_time=last["step_time"], run_dir=run.run_dir)


def print_table(report: dict) -> None:
  size, runs, gap = report["size"], report["runs"], report["exact_match_gap_points"]
  print(f"default experiment{'' if size == 'full' else f' ({size} size)'}: exact match over "
        f"{runs['float32']['decoded']} validation sentences")
  print(f"{'dtype':<9} {'steps':>5} {'exact match':>11} {'BLEU':>6} {'val loss':>8} "
        f"{'train loss':>10} {'step s':>7} {'run s':>6}")
  for r in runs.values():
    print(f"{r['dtype']:<9} {r['steps']:>5} {r['exact_match']:>11.1%} {r['bleu']:>6.1f} "
          f"{r['validation_loss']:>8.4f} {r['final_train_loss']:>10.4f} "
          f"{r['step_time']:>7.3f} {r['seconds']:>6.0f}")
  print(f"bfloat16 is {gap:+.1f} points behind float32 (tolerance "
        f"{report['tolerance_points']:g}): {'PASS' if report['passed'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  quick = SIZES["quick"]
  parser.add_argument("--quick", action="store_true",
                      help=f"--size quick: D={quick['model.d_model']}, F={quick['model.d_ff']}, "
                           f"{quick['train.steps']} steps")
  parser.add_argument("--size", choices=sorted(SIZES), default="full",
                      help="overrides of the default experiment (SIZES); 'full': none")
  parser.add_argument("--tolerance", type=float, default=1.0,
                      help="exact match points bfloat16 may lose (default 1)")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "jaxformer_bf16_quality"))
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  size = "quick" if args.quick else args.size
  jax_internals.install()  # As the jaxformer CLI does, before the first compilation.
  runs = {dtype: train(dtype, size, args.workdir) for dtype in DTYPES}
  gap = 100 * (runs["float32"]["exact_match"] - runs["bfloat16"]["exact_match"])
  report = dict(date=time.strftime("%Y-%m-%d %H:%M"), size=size, runs=runs,
                exact_match_gap_points=gap, tolerance_points=args.tolerance,
                passed=gap <= args.tolerance)
  common.print_report(report, args.json, print_table)
  return 0 if report["passed"] else 1


if __name__ == "__main__":
  sys.exit(main())
