"""Where metrics go: `<workdir>/metrics.jsonl` and TensorBoard event files, from process 0 only.

Each call to `write` appends one JSON object, `{"step": ..., "split": ..., <metric>: ...}`, to
metrics.jsonl and adds every number to `<workdir>/tensorboard` as `<split>/<metric>`. The workdir
may be a local directory or on gs:// (TensorBoard files there need google-cloud-storage, the
`tpu` extra).

Each step is in metrics.jsonl once: a run that restarts from step S (a resume after a crash or
kill -9, a `--restore-step`) trains the steps after S again, so `MetricsWriter.start_at(S)`
first moves the records of those steps to `<workdir>/superseded/metrics.<n>.jsonl`, and tells
TensorBoard to hide their old events.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxformer import workdir as workdir_lib
from jaxformer.log import log


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported on first use (slow, and only process 0 needs it).

  tensorboardX imports torch whenever torch is installed (the interop extra), only for its type
  hints; jaxformer writes floats and numpy arrays. That import adds seconds to the start of
  every run, so unless something has imported torch already, it is kept out meanwhile: a None
  in sys.modules makes `import torch` raise ImportError, which tensorboardX expects.
  """
  keep_out = "torch" not in sys.modules
  if keep_out:
    sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if keep_out:
      del sys.modules["torch"]
  return SummaryWriter


def can_append(path: epath.Path) -> bool:
  """Local files can be appended to; objects in gs:// (or another object store) cannot."""
  return "://" not in str(path)


def append_text(path: epath.Path, text: str) -> None:
  """Appends `text` to the file at `path`, creating it if needed.

  Where files cannot be appended to (gs://), the file is read and written back whole: cheap for
  metrics.jsonl, one line per logged step and per evaluation.
  """
  if can_append(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text((path.read_text() if path.exists() else "") + text)


def replace_text(path: epath.Path, text: str) -> None:
  """Writes `text` as the whole file at `path`, atomically: readers see the old file or the new
  one, never half of it (a local temporary file replaces it; gs:// objects are written whole)."""
  if not can_append(path):
    path.write_text(text)
    return
  tmp_path = path.parent / f"{path.name}.tmp"
  with open(tmp_path, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp_path, path)


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a line that is not a record (kept as it is)."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  step = record.get("step") if isinstance(record, dict) else None
  return step if isinstance(step, int) and not isinstance(step, bool) else None


def set_aside_records_after(workdir: str, step: int) -> tuple[int, epath.Path | None]:
  """Moves every record of `<workdir>/metrics.jsonl` with a step after `step` to the first free
  `<workdir>/superseded/metrics.<n>.jsonl`; returns how many, and where (None when none).

  The records of averaged checkpoints (step -1) and lines that are not records stay. The set
  aside records are written first, then metrics.jsonl is replaced whole: a crash in between
  leaves them in both files, never in neither.
  """
  path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
  if not path.exists():
    return 0, None
  kept, later = [], []
  for line in path.read_text(encoding="utf-8").splitlines():
    if line.strip():
      record_step = _step_of(line)
      (later if record_step is not None and record_step > step else kept).append(line + "\n")
  if not later:
    return 0, None
  target = workdir_lib.superseded_metrics_path(workdir)
  target.parent.mkdir(parents=True, exist_ok=True)
  replace_text(target, "".join(later))
  replace_text(path, "".join(kept))
  return len(later), target


def read_records(workdir: str) -> list[dict[str, Any]]:
  """The records of `<workdir>/metrics.jsonl` in file order ([] when there is none); lines that
  are not records (a line cut short by a crash, say) are skipped."""
  path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
  if not path.exists():
    return []
  records = []
  for line in path.read_text(encoding="utf-8").splitlines():
    if _step_of(line) is not None:
      records.append(json.loads(line))
  return records


def _plain(value: Any) -> Any:
  """A JSON-friendly version of a metric value (NaN and infinity become strings)."""
  if isinstance(value, (np.generic, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends metrics to metrics.jsonl and TensorBoard. Does nothing on processes other than 0.

  The event file is opened at the first write, or by `start_at`, which the training loop calls
  once, before its first write.
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self.path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
    self._tensorboard = None

  def start_at(self, step: int) -> None:
    """Starts the metrics of a run that trains from `step` (0, or the step it resumed from):
    records of later steps, left by an earlier run, are set aside (`set_aside_records_after`),
    and TensorBoard is told to drop their events (purge_step)."""
    if not self.enabled:
      return
    count, target = set_aside_records_after(self.workdir, step)
    if count:
      log(f"jaxformer: {count} record(s) of {self.path} are of steps after {step}, which this "
          f"run trains again; they are kept in {target}")
    self._events(purge_step=step + 1)

  def _events(self, purge_step: int | None = None):
    """The TensorBoard writer, opened on first use."""
    if self._tensorboard is None:
      SummaryWriter = _summary_writer_class()
      # purge_step: TensorBoard hides the events of earlier files at this step and later.
      self._tensorboard = SummaryWriter(
          os.path.join(self.workdir, workdir_lib.TENSORBOARD_DIR), purge_step=purge_step)
    return self._tensorboard

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _plain(v) for k, v in metrics.items() if k not in ("step", "split")})
    append_text(self.path, json.dumps(record) + "\n")
    for key, value in record.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
        self._events().add_scalar(f"{split}/{key}", value, step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._events().add_text(tag, text, step)

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """`image` is [height, width, 3] uint8."""
    if self.enabled:
      self._events().add_image(tag, image, step, dataformats="HWC")

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
