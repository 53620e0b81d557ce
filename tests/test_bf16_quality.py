"""bfloat16 compute trains the default task to within 1 point of float32's exact match.

Runs `benchmarks/bf16_quality.py` as a user runs it, at its 'test' size (the default experiment
with D=64, less data, 150 steps): two real trainings through the training loop, float32 and
bfloat16 from the same seed and data, each decoding all 400 validation sentences with beam 4.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "bf16_quality.py")
TOLERANCE_POINTS = 1.0
LEARNED = 0.95  # float32 must have learned the task, or the comparison says nothing.


def test_bfloat16_trains_the_default_task_as_well_as_float32(tmp_path):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",  # one device, as a user runs it
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  done = subprocess.run(
      [sys.executable, SCRIPT, "--size", "test", "--json", "--tolerance",
       str(TOLERANCE_POINTS), "--workdir", str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode in (0, 1), done.stderr[-3000:]
  report = json.loads(done.stdout[done.stdout.index("{"):])
  f32, bf16 = report["runs"]["float32"], report["runs"]["bfloat16"]

  assert f32["decoded"] == bf16["decoded"] == 400    # every validation sentence was decoded
  assert f32["exact_match"] >= LEARNED, f32
  gap = 100 * (f32["exact_match"] - bf16["exact_match"])
  assert gap <= TOLERANCE_POINTS, (f32, bf16)
  assert report["passed"] and done.returncode == 0
  # The runs really differed in their compute dtype (and only in it).
  for run in (f32, bf16):
    with open(os.path.join(run["run_dir"], "config.json")) as f:
      assert json.load(f)["model"]["dtype"] == run["dtype"]
