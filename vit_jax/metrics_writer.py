"""Scalar metrics to `metrics.jsonl` and TensorBoard events (tensorboardX: no TensorFlow needed).

Only process 0 writes; on other processes every method is a no-op.
"""
import json
import os

import jax
from absl import logging

from vit_jax.workdir import METRICS_FILE


class MetricsWriter:
  """Appends one JSON object per step to `workdir/metrics.jsonl` and mirrors each scalar to TensorBoard.

  `resume_step`: the checkpoint step a resumed run starts from (0 for a fresh start). TensorBoard then drops the
  points of later steps that a previous run logged before dying (a purge marker at `resume_step + 1`), so re-done
  steps appear once.
  """

  def __init__(self, workdir, resume_step=None):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, METRICS_FILE)
    self._tensorboard = None
    if self._active:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(logdir=workdir,
                                        purge_step=None if resume_step is None else resume_step + 1)

  def restore(self, step, records):
    """Makes metrics.jsonl the record of steps 1..`step` on resume: drops records of later steps (logged by a run
    that died before its next checkpoint) and lines cut short or damaged, and puts back any of `records` (those
    written since the previous checkpoint, kept in the checkpoint) that is missing."""
    if not self._active:
      return
    lines = []
    if os.path.exists(self._path):
      with open(self._path, "rb") as f:
        lines = f.read().splitlines()
    kept, later, unreadable = [], 0, 0
    for line in lines:
      try:
        record = json.loads(line)
        record_step = record["step"]
        if not isinstance(record_step, int):
          raise TypeError(record_step)
      except (ValueError, KeyError, TypeError):  # cut by a kill, damaged, or not UTF-8
        unreadable += 1
        continue
      if record_step <= step:
        kept.append(record)
      else:
        later += 1
    as_text = lambda record: json.dumps(record, sort_keys=True)  # NaN != NaN; its text is equal
    present = {as_text(record) for record in kept}
    missing = [record for record in records if as_text(record) not in present]
    if not (later or unreadable or missing):
      return
    kept = sorted(kept + missing, key=lambda record: record["step"])  # stable: a step's records keep their order
    logging.info("Resuming at step %d: metrics.jsonl %s.", step, ", ".join(part for part in (
        later and f"dropped {later} record(s) of later steps", unreadable and f"skipped {unreadable} unreadable "
        "line(s)", missing and f"restored {len(missing)} record(s) from the checkpoint") if part))
    tmp = self._path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(record) + "\n" for record in kept))
    os.replace(tmp, self._path)

  def write(self, step, metrics):
    """Appends the record of `step`; returns it (the loop keeps the records since the last checkpoint)."""
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    if not self._active:
      return record
    with open(self._path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in metrics.items():
      self._tensorboard.add_scalar(key, float(value), int(step))
    self._tensorboard.flush()
    return record

  def close(self):
    if self._tensorboard is not None:
      self._tensorboard.close()
