"""Tests of jaxformer/workdir.py: the run config recorded in a workdir, which changes of it
a resumed run may make, and the lock that keeps a second trainer out."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from jaxformer import config as config_lib
from jaxformer import launcher
from jaxformer import workdir as workdir_lib
from jaxformer.errors import CheckpointError

WorkdirError = workdir_lib.WorkdirError
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(workdir, **overrides):
  config = config_lib.get_default_config()
  config_lib.apply_overrides(config, {k: str(v) for k, v in overrides.items()})
  workdir_lib.write_run_config(str(workdir), config)
  return config


def test_check_compatible_names_breaking_keys_and_allows_harmless_ones():
  saved = config_lib.get_default_config()
  harmless = config_lib.get_default_config()
  harmless.train.steps = saved.train.steps * 2
  harmless.model.dropout_rate = 0.3
  harmless.checkpoint.keep = 7
  assert workdir_lib.check_compatible(saved, harmless) == [
      "checkpoint.keep", "model.dropout_rate", "train.steps"]

  changed = config_lib.get_default_config()
  changed.model.d_model = 256
  changed.train.steps = 5
  with pytest.raises(CheckpointError, match=r"model\.d_model \(512 -> 256\)") as info:
    workdir_lib.check_compatible(saved, changed)
  assert "train.steps" not in str(info.value)

  learned = config_lib.get_default_config()
  learned.model.pos_encoding = "learned"
  longer = config_lib.get_default_config()
  longer.model.pos_encoding = "learned"
  longer.model.max_len = 512
  with pytest.raises(CheckpointError, match=r"model\.max_len \(256 -> 512\)"):
    workdir_lib.check_compatible(learned, longer)
  sinusoidal_longer = config_lib.get_default_config()
  sinusoidal_longer.model.max_len = 512  # Sinusoidal positions have no parameters.
  assert workdir_lib.check_compatible(saved, sinusoidal_longer) == ["model.max_len"]


def test_a_fine_tuning_run_keeps_the_model_and_may_change_the_data_and_the_training():
  source = config_lib.load_config("default")
  changed = config_lib.get_default_config()
  changed.update(source.as_configdict())
  changed.data.task, changed.data.vocab_type = "numbers_es_en", "bpe"  # The vocab is copied.
  changed.train.learning_rate, changed.model.dropout_rate = 0.01, 0.3
  workdir_lib.check_can_start_from(source, changed)
  changed.model.d_ff, changed.model.activation = 1024, "gelu"
  with pytest.raises(CheckpointError, match=r"model\.d_ff \(512 in the source, 1024 here\), "
                     r"model\.activation \('relu' in the source, 'gelu' here\)") as info:
    workdir_lib.check_can_start_from(source, changed)
  assert "data." not in str(info.value) and "train." not in str(info.value)


def test_the_fine_tuning_experiment_starts_from_a_run_of_the_default_experiment():
  workdir_lib.check_can_start_from(config_lib.load_config("default"),
                                   config_lib.load_config("default_finetune"))


def test_write_run_files_keeps_history_and_refuses_incompatible_configs(tmp_path):
  workdir = str(tmp_path)
  write_config(tmp_path, **{"train.steps": 100})
  os.makedirs(os.path.join(workdir, "checkpoints", "10"))  # A saved step: the config binds.
  config_path = os.path.join(workdir, "config.json")
  assert json.load(open(config_path))["train"]["steps"] == 100
  write_config(tmp_path, **{"train.steps": 100})  # Same config: nothing to record.
  assert not os.path.exists(os.path.join(workdir, "config.1.json"))

  write_config(tmp_path, **{"train.steps": 200})
  assert json.load(open(config_path))["train"]["steps"] == 200
  assert json.load(open(os.path.join(workdir, "config.1.json")))["train"]["steps"] == 100

  before = open(config_path).read()
  with pytest.raises(CheckpointError, match=r"model\.num_layers \(6 -> 2\)"):
    write_config(tmp_path, **{"train.steps": 200, "model.num_layers": 2})
  assert open(config_path).read() == before
  assert workdir_lib.read_run_config(workdir).train.steps == 200


def test_a_workdir_without_checkpoints_takes_another_model_and_keeps_the_old_config(tmp_path):
  """A run that failed before its first checkpoint left config.json: it binds nothing."""
  workdir = str(tmp_path)
  write_config(tmp_path, **{"model.d_model": 256})
  os.makedirs(os.path.join(workdir, "checkpoints", "20.orbax-checkpoint-tmp-1"))  # Unfinished.
  assert not workdir_lib.has_checkpoints(workdir)
  write_config(tmp_path, **{"model.d_model": 128})
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["d_model"] == 128
  assert json.load(open(os.path.join(workdir, "config.1.json")))["model"]["d_model"] == 256


def test_a_workdir_without_checkpoints_keeps_its_vocabulary_only_for_the_same_data(tmp_path):
  workdir = str(tmp_path)
  write_config(tmp_path, **{"model.vocab_size": 8000})
  open(os.path.join(workdir, "vocab.model"), "wb").close()
  write_config(tmp_path, **{"model.vocab_size": 8000, "model.d_model": 128})  # Same vocabulary.
  before = open(os.path.join(workdir, "config.json")).read()
  for change in ({"model.vocab_size": 16000}, {"data.task": "copy"}):
    with pytest.raises(CheckpointError, match=r"vocab\.model was trained for other data: "
                       + next(iter(change)).replace(".", r"\.")):
      write_config(tmp_path, **{"model.vocab_size": 8000, **change})
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_check_can_write_refuses_a_file_and_a_read_only_place(tmp_path, monkeypatch):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is a file, not a directory"):
    workdir_lib.check_can_write(str(a_file))
  with pytest.raises(workdir_lib.WorkdirError, match=r"cannot be created: .*a_file is a file"):
    workdir_lib.check_can_write(str(a_file / "run"))
  workdir_lib.check_can_write(str(tmp_path / "new" / "run"))  # Created later, by the run.
  assert not (tmp_path / "new").exists()
  # Permissions as a user without write access sees them (root writes anywhere).
  monkeypatch.setattr(os, "access", lambda path, mode: False)
  with pytest.raises(workdir_lib.WorkdirError, match="cannot be written"):
    workdir_lib.check_can_write(str(tmp_path / "run"))


def test_storage_problem_finds_a_full_disk_in_the_errors_chain_and_nothing_else(tmp_path):
  full = OSError(28, "No space left on device", str(tmp_path / "vocab.model"))
  assert workdir_lib.storage_problem(full).startswith(
      f"no space left on device writing {tmp_path / 'vocab.model'} (")
  tensorstore = ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{tmp_path}/d/1f": Failed to '
                           "write 7711 bytes to file 11: No space left on device "
                           "[os_error_code='28']")
  try:
    try:
      raise tensorstore
    except ValueError as e:
      raise RuntimeError("the save failed") from e
  except RuntimeError as wrapped:
    assert workdir_lib.storage_problem(wrapped).startswith(
        f"no space left on device writing {tmp_path}/d/1f (")
  assert workdir_lib.storage_problem(OSError(30, "Read-only", "/x")).startswith(
      "read-only file system writing /x")
  assert workdir_lib.storage_problem(FileNotFoundError(2, "missing", "/x")) is None
  assert workdir_lib.storage_problem(ValueError("a bug")) is None


# --- The lock. ---------------------------------------------------------------------------------

# Takes the lock of the workdir in argv[1] and holds it until killed.
HOLD_LOCK = """
import sys, time
from jaxformer import workdir
workdir.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def python(code, *args, **kwargs):
  env = dict(os.environ, PYTHONPATH=ROOT, **kwargs.pop("env", {}))
  return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_a_second_lock_names_the_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
  workdir = str(tmp_path / "run")
  holder = python(HOLD_LOCK, workdir)
  try:
    assert holder.stdout.readline() == "locked\n", holder.stderr.read()
    with pytest.raises(workdir_lib.WorkdirBusyError) as info:
      workdir_lib.WorkdirLock(workdir).acquire()
    message = str(info.value)
    assert message.startswith(f"{workdir} is in use by another trainer (pid {holder.pid} on host "
                              f"{socket.gethostname()}, started 20"), message
    assert message.endswith("wait for it to finish, stop it, or use another --workdir")
    assert "\n" not in message
    assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]  # The loser wrote nothing.
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
  # The kernel released the lock with the process: no stale lock to remove by hand.
  with workdir_lib.WorkdirLock(workdir) as lock:
    assert json.load(open(lock.path))["pid"] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirBusyError, match=rf"\(pid {os.getpid()} on host "):
      workdir_lib.WorkdirLock(workdir).acquire()  # A second open file: flock is per file.
  assert open(lock.path).read() == ""  # Released, and no longer naming this process.
  workdir_lib.WorkdirLock(workdir).acquire()


def test_a_file_in_place_of_the_workdir_is_a_one_line_error(tmp_path):
  not_a_dir = tmp_path / "run"
  not_a_dir.write_text("x")
  with pytest.raises(WorkdirError, match=rf"^--workdir {not_a_dir} is a file, not a directory; "):
    workdir_lib.WorkdirLock(str(not_a_dir)).acquire()
  with pytest.raises(WorkdirError, match=rf"^cannot create the lock file {not_a_dir}/sub/lock "
                                         r"\(Not a directory\); "):
    workdir_lib.WorkdirLock(str(not_a_dir / "sub")).acquire()
  assert not_a_dir.read_text() == "x"


def test_a_read_only_workdir_is_a_one_line_error(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()

  def read_only(path, *args):  # As on a read-only mount (tests may run as root, who may write).
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

  monkeypatch.setattr(workdir_lib.os, "open", read_only)
  with pytest.raises(WorkdirError, match=rf"^cannot create the lock file {workdir}/lock "
                                         r"\(Read-only file system\); --workdir must be"):
    workdir_lib.WorkdirLock(str(workdir)).acquire()


def test_a_url_workdir_locks_a_local_file_named_by_its_url():
  a, b = workdir_lib.lock_path("gs://bucket/a"), workdir_lib.lock_path("gs://bucket/b")
  assert a != b and a == workdir_lib.lock_path("gs://bucket/a/")
  assert os.path.dirname(a) == os.path.dirname(b) and "://" not in a
  assert workdir_lib.lock_path("run") == os.path.join(os.getcwd(), "run", "lock")


# Joins a pod of 2 processes, then tries to lock the workdir in argv[1]; prints the error.
POD_LOCK = """
import sys
from jaxformer import devices, workdir
devices.initialize_distributed()
try:
  workdir.WorkdirLock(sys.argv[1]).acquire()
  print("locked")
except workdir.WorkdirBusyError as e:
  print(f"error: {e}")
"""


def test_every_process_of_a_pod_raises_the_error_of_process_0(tmp_path):
  workdir = str(tmp_path / "run")
  address = f"127.0.0.1:{launcher.free_port()}"
  with workdir_lib.WorkdirLock(workdir):
    pod = [python(POD_LOCK, workdir, env={
        "JAXFORMER_COORDINATOR_ADDRESS": address, "JAXFORMER_NUM_PROCESSES": "2",
        "JAXFORMER_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}) for i in range(2)]
    outputs = [process.communicate(timeout=120) for process in pod]
  lines = [out.strip().splitlines()[-1] for out, _ in outputs]  # After gloo's own lines.
  assert all(p.returncode == 0 for p in pod), [err[-2000:] for _, err in outputs]
  assert lines[0] == lines[1], lines  # Process 1 raised the very error process 0 met.
  assert lines[0].startswith(f"error: {workdir} is in use by another trainer (pid {os.getpid()} ")
