"""Where metrics go: `<workdir>/metrics.jsonl` and TensorBoard event files, from process 0 only.

Each call to `write` appends one JSON object, `{"step": ..., "split": ..., <metric>: ...}`, to
metrics.jsonl and adds every number to `<workdir>/tensorboard` as `<split>/<metric>`. The workdir
may be a local directory or on gs:// (TensorBoard files there need google-cloud-storage, the
`tpu` extra).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxformer import workdir as workdir_lib


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


def _plain(value: Any) -> Any:
  """A JSON-friendly version of a metric value (NaN and infinity become strings)."""
  if isinstance(value, (np.generic, jax.Array)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsWriter:
  """Appends metrics to metrics.jsonl and TensorBoard. Does nothing on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = workdir_lib.path(workdir, workdir_lib.METRICS_FILE)
    self._tensorboard = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # Imported lazily: slow, and only process 0 needs it.
      self._tensorboard = SummaryWriter(os.path.join(workdir, workdir_lib.TENSORBOARD_DIR))

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split}
    record.update({k: _plain(v) for k, v in metrics.items() if k not in ("step", "split")})
    append_text(self.path, json.dumps(record) + "\n")
    for key, value in record.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
        self._tensorboard.add_scalar(f"{split}/{key}", value, step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tensorboard.add_text(tag, text, step)

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """`image` is [height, width, 3] uint8."""
    if self.enabled:
      self._tensorboard.add_image(tag, image, step, dataformats="HWC")

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
