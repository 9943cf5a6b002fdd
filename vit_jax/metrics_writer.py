"""Scalar metrics to `metrics.jsonl` and TensorBoard events (tensorboardX: no TensorFlow needed).

Only process 0 writes; on other processes every method is a no-op.
"""
import json
import os

import jax
from absl import logging

from vit_jax.workdir import METRICS_FILE


class MetricsWriter:
  """Appends one JSON object per step to `workdir/metrics.jsonl` and mirrors each scalar to TensorBoard."""

  def __init__(self, workdir):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, METRICS_FILE)
    self._tensorboard = None
    if self._active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(logdir=workdir)

  def truncate_after(self, step):
    """Drops records of steps after `step`: they were logged by a run that died before its next checkpoint."""
    if not self._active or not os.path.exists(self._path):
      return
    with open(self._path, encoding="utf-8") as f:
      lines = f.read().splitlines()
    kept = []
    for line in lines:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except (ValueError, KeyError):  # a line cut short by a kill
        continue
    if len(kept) != len(lines):
      logging.info("Resuming at step %d: dropped %d metric record(s) written after it.", step,
                   len(lines) - len(kept))
      tmp = self._path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
      os.replace(tmp, self._path)

  def write(self, step, metrics):
    if not self._active:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self._path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in metrics.items():
      self._tensorboard.add_scalar(key, float(value), int(step))
    self._tensorboard.flush()

  def close(self):
    if self._tensorboard is not None:
      self._tensorboard.close()
