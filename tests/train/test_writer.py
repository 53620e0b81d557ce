"""jaxformer/train/writer.py: a run that restarts at step S sets aside the records of metrics.jsonl
past S, so each step is there once, and TensorBoard is told to hide their old events.

(Appending records, also where files cannot be appended to, is tested in tests/test_multihost.py.)
"""

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest
from tensorboardX.proto import event_pb2

from jaxformer.train import writer as writer_lib


def record(step, split="train", **metrics):
  return {"step": step, "split": split, **metrics}


def write_lines(path, lines):
  with open(path, "w") as f:
    f.write("".join(lines))


def read_records(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def events(workdir):
  """Every Event of every TensorBoard file in `workdir` (the TFRecord framing read by hand:
  length, its CRC, the event, its CRC)."""
  found = []
  for name in sorted(glob.glob(os.path.join(workdir, "tensorboard", "*"))):
    with open(name, "rb") as f:
      data = f.read()
    while data:
      (length,) = struct.unpack("<Q", data[:8])
      found.append(event_pb2.Event.FromString(data[12:12 + length]))
      data = data[12 + length + 4:]
  return found


@pytest.mark.parametrize("appendable", [True, False])  # False: as on gs://, written whole.
def test_a_restart_sets_aside_the_records_past_its_step_each_time_in_a_new_file(
    appendable, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(writer_lib, "can_append", lambda path: appendable)
  workdir, metrics = str(tmp_path), str(tmp_path / "metrics.jsonl")
  killed_run = [record(10, loss=3.0), record(20, loss=2.0), record(20, "validation", bleu=1.0),
                record(-1, "test", bleu=5.0, checkpoint="last2_10-20"),  # An averaged one.
                record(30, loss=1.5), record(30, "validation", bleu=2.0), record(40, loss=1.0)]
  lines = [json.dumps(r) + "\n" for r in killed_run]
  # A line that is no record stays where it is; the last line was cut short (no newline).
  write_lines(metrics, lines[:4] + ["not json\n"] + lines[4:] + ['{"step": 41, "spl'])

  writer = writer_lib.MetricsWriter(workdir, enabled=True)
  writer.start_at(20)  # Resumed from the checkpoint at step 20.
  first = tmp_path / "superseded" / "metrics.1.jsonl"
  assert read_records(first) == killed_run[4:]
  assert open(metrics).read() == "".join(lines[:4]) + "not json\n" + '{"step": 41, "spl\n'
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl", "superseded", "tensorboard"]
  err = capsys.readouterr().err
  assert err == (f"jaxformer: 3 record(s) of {metrics} are of steps after 20, which this run "
                 f"trains again; they are kept in {first}\n")
  writer.write(21, "train", {"loss": 1.9})
  writer.close()
  # TensorBoard hides the events of steps 21 and later of the files before this one.
  starts = [e.step for e in events(workdir) if e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [21]

  again = writer_lib.MetricsWriter(workdir, enabled=True)
  again.start_at(10)  # A second restart, from an older step (--restore-step 10).
  again.close()
  assert read_records(first) == killed_run[4:]  # The first set-aside file is left alone.
  assert read_records(tmp_path / "superseded" / "metrics.2.jsonl") == [
      killed_run[1], killed_run[2], record(21, loss=1.9)]
  assert open(metrics).read() == lines[0] + lines[3] + "not json\n" + '{"step": 41, "spl\n'
  assert capsys.readouterr().err.endswith(
      f"3 record(s) of {metrics} are of steps after 10, which this run trains again; they are "
      f"kept in {tmp_path / 'superseded' / 'metrics.2.jsonl'}\n")


def test_a_start_with_nothing_to_set_aside_moves_and_says_nothing(tmp_path, capsys):
  workdir = str(tmp_path)
  writer_lib.MetricsWriter(workdir, enabled=True).start_at(0)  # A fresh workdir.
  write_lines(tmp_path / "metrics.jsonl", [json.dumps(record(10)) + "\n"])
  before = os.stat(tmp_path / "metrics.jsonl")
  writer_lib.MetricsWriter(workdir, enabled=True).start_at(10)
  assert os.stat(tmp_path / "metrics.jsonl").st_ino == before.st_ino  # Not rewritten.
  assert not os.path.exists(tmp_path / "superseded")
  assert capsys.readouterr().err == ""


def test_processes_other_than_0_leave_metrics_alone(tmp_path):
  write_lines(tmp_path / "metrics.jsonl", [json.dumps(record(10)) + "\n"])
  writer_lib.MetricsWriter(str(tmp_path), enabled=False).start_at(0)
  assert read_records(tmp_path / "metrics.jsonl") == [record(10)]
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


# Run in a fresh interpreter: writes one scalar through a MetricsWriter in the workdir argv[1],
# then says whether torch was imported.
WRITE_ONE_SCALAR = """
import sys
from jaxformer.train import writer
metrics = writer.MetricsWriter(sys.argv[1], enabled=True)
metrics.start_at(0)
metrics.write(1, "train", {"loss": 1.5})
metrics.close()
print("torch imported" if "torch" in sys.modules else "torch not imported")
"""


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch where it is installed (the interop extra), seconds at the start
  of every run; the writer keeps it out and the events are still written."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  done = subprocess.run([sys.executable, "-c", WRITE_ONE_SCALAR, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split("\n")[-2] == "torch not imported", done.stdout
  scalars = [(v.tag, v.simple_value) for e in events(str(tmp_path)) for v in e.summary.value]
  assert scalars == [("train/loss", 1.5)]
