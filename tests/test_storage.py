"""A full disk and a read-only one, for real: small tmpfs mounts (these tests need root, and are
skipped without it). A full disk ends training with one line naming the path, the free space
and the last good checkpoint, from which the same command resumes once there is room; a
read-only workdir is refused by `train` before any work, and `evaluate` still prints its result.
"""

import contextlib
import json
import os
import subprocess
import tempfile

import pytest

from tests import run_testing

pytestmark = pytest.mark.slow


def _can_mount() -> bool:
  """Whether this process may mount a tmpfs (a probe of its own: pytest-xdist workers collect
  this module at the same time)."""
  if os.geteuid() != 0:
    return False
  probe = tempfile.mkdtemp(prefix="jaxformer_mount_probe_")
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe],
                           capture_output=True).returncode == 0
  if mounted:
    subprocess.run(["umount", "-l", probe], check=True)
  os.rmdir(probe)
  return mounted


requires_mount = pytest.mark.skipif(not _can_mount(), reason="needs root to mount a tmpfs")


@contextlib.contextmanager
def tmpfs(path, size: str):
  os.makedirs(path)
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
  try:
    yield str(path)
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path, options: str) -> None:
  subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_testing.session_runs(tmp_path_factory)


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@requires_mount
def test_a_full_disk_is_one_line_and_the_same_command_resumes_once_there_is_room(runs, tmp_path):
  # 1.2 MB: the vocabulary, the config and the first checkpoint fit; the second does not.
  with tmpfs(tmp_path / "disk", "1200k") as disk:
    workdir = runs.new_workdir(os.path.join(disk, "w"))
    args = runs.train_args(workdir, train__steps=40, checkpoint__every_steps=10,
                           checkpoint__keep=100, train__eval_every_steps=1000,
                           train__log_every_steps=10)
    full = runs.run(args)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    [line] = error_lines(full.stderr)
    saved = run_testing.checkpoint_steps(workdir)
    assert saved and saved[-1] < 40
    assert line.startswith("error: no space left on device writing " + workdir)
    assert " free)" in line
    assert f"the last good checkpoint is step {saved[-1]} in {workdir}/checkpoints" in line
    assert "run the same command to resume" in line

    remount(disk, "size=64m")
    resumed = runs.run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from the checkpoint at step {saved[-1]}" in resumed.stderr
    assert run_testing.checkpoint_steps(workdir)[-1] == 40


@requires_mount
def test_a_read_only_workdir_refuses_train_and_evaluate_prints_its_result(runs, tmp_path):
  with tmpfs(tmp_path / "disk", "64m") as disk:
    workdir = run_testing.copy_workdir(runs.reference(), os.path.join(disk, "w"))
    metrics_before = open(os.path.join(workdir, "metrics.jsonl")).read()
    remount(disk, "ro")
    train = runs.run(runs.train_args(workdir))
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert error_lines(train.stderr) == [
        f"error: --workdir {workdir} cannot be written (a read-only file system at {workdir}); "
        "choose a directory you can write"]

    evaluate = runs.run(["evaluate", "--workdir", workdir, "--split", "validation"])
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert f"could not update {workdir}/metrics.jsonl" in evaluate.stderr
    assert json.loads(evaluate.stdout)["split"] == "validation"
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics_before
