"""grain pipelines: host-sharded, shuffled and repeated training; exact, padded and masked evaluation.

Layout of a training pipeline on process p of P (each process runs its own):

  source[p::P] -> shuffle(seed) -> repeat -> random_map(preprocess)      (grain MapDataset: index-addressed,
    -> to_iter_dataset -> skip corrupt -> batch(batch // P) [-> mixup]      so the iterator state is small)
    -> mp_prefetch(num_workers)                                          (worker processes; state per worker)
    -> background thread: jax.make_array_from_process_local_data -> queue of `prefetch` device batches

The per-example random stream is seeded by (seed, process index, example position), so a restored
iterator replays exactly what the uninterrupted one would have produced. The state depends on
`num_workers` (grain gives each worker its own slice), so resume with the same `num_workers`.

Evaluation pads the split to ceil(N / batch_eval) global batches, gives each process a contiguous block of
that padded index range, and marks padding (and corrupt images) with mask 0: every process runs the same
number of steps, and every real example is scored exactly once.
"""
import json
import math
import queue
import threading

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from vit_jax.data import preprocess as pp_lib
from vit_jax.data import sources
from vit_jax.errors import UserError

_FIRST_PATHS = 5  # how many corrupt paths a warning names


# ------------------------------------------------------------------------------------------- checks


def _processes(process_index, process_count):
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} outside [0, {count})")
  return index, count


def data_parallel_size(sharding) -> int:
  """Devices that dim 0 (the batch) is split over, from a NamedSharding's spec."""
  spec = getattr(sharding, "spec", None)
  if sharding is None or spec is None or len(spec) == 0 or spec[0] is None:
    return 1
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return math.prod(sharding.mesh.shape[a] for a in axes)


def check_batch(batch: int, key: str, process_count: int, sharding) -> int:
  """Returns the per-process batch; a UserError when the global batch cannot be split evenly."""
  if not isinstance(batch, int) or batch <= 0:
    raise UserError(f"config.{key}={batch!r} must be a positive int")
  if batch % process_count:
    raise UserError(f"config.{key}={batch} is not divisible by the number of processes ({process_count}); "
                    f"use a multiple of {process_count}")
  dp = data_parallel_size(sharding)
  if batch % dp:
    raise UserError(f"config.{key}={batch} is not divisible by the {dp} data-parallel devices of the mesh; "
                    f"use a multiple of {dp}")
  return batch // process_count


def _seed(*parts) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _read_options(config, local_batch):
  # Threads overlap file reads and PIL's GIL-free decode/resize; the buffer holds preprocessed examples,
  # so it is kept near one batch rather than grain's default of 500 (300 MB of 224px float32 images).
  return grain.ReadOptions(num_threads=int(config.get("read_threads", 2)),
                           prefetch_buffer_size=max(2 * local_batch, 8))


def _mp(ds, config):
  workers = int(config.get("num_workers", 0) or 0)
  if workers < 0:
    raise UserError(f"config.num_workers={workers} must be >= 0 (0 = load in the main process)")
  if not workers:
    return ds
  if not flags.FLAGS.is_parsed():
    # grain's workers read absl flags; outside an absl app (library use, pytest) use their defaults.
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


# ------------------------------------------------------------------------------------ grain pieces


def stack_examples(examples):
  """batch_fn: stacks arrays; joins the corrupt-image notes into one string (one leaf, cheap to ship)."""
  out = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "_skipped"}
  out["_skipped"] = "\n".join(e["_skipped"] for e in examples if e["_skipped"])
  return out


class _SkipCorruptIterator(grain.DatasetIterator):
  """Drops corrupt examples; their notes ride on the next good example so the main process can count them."""

  def __init__(self, parent, limit):
    super().__init__(parent)
    self._limit = limit

  def __next__(self):
    skipped = []
    while True:
      example = next(self._parent)
      if not example["_skipped"]:
        break
      skipped.append(example["_skipped"])
      if len(skipped) > self._limit:  # with repeat() an all-corrupt dataset would otherwise loop forever
        raise UserError(f"no readable image in {len(skipped)} consecutive examples, e.g. {skipped[0]}")
    if skipped:
      example = dict(example, _skipped="\n".join(skipped))
    return example

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SkipCorruptIterDataset(grain.IterDataset):

  def __init__(self, parent, limit):
    super().__init__(parent)
    self._limit = limit

  def __iter__(self):
    return _SkipCorruptIterator(self._parent.__iter__(), self._limit)


class _EvalRecord:
  """Picklable index -> eval example; indices past the split are padding."""

  def __init__(self, source, preprocess, num_examples):
    self.source, self.preprocess, self.num_examples = source, preprocess, num_examples

  def __call__(self, index):
    if index >= self.num_examples:
      return self.preprocess.padding()
    return self.preprocess(self.source[index])


def host_train_dataset(config, process_index=None, process_count=None, local_batch=None):
  """(grain IterDataset of this process's training batches of batch // process_count, shard size)."""
  index, count = _processes(process_index, process_count)
  pp_lib.check_pp(config.pp)
  local_batch = local_batch or check_batch(config.batch, "batch", count, None)
  source = sources.open_source(config, config.pp.train)
  ds = grain.MapDataset.source(source)[index::count]  # disjoint shards
  shard_size = len(ds)
  if shard_size < local_batch:
    raise UserError(f"split {source.description!r} has {len(source)} examples, {len(ds)} on this process: "
                    f"fewer than one batch of {local_batch}; lower config.batch")
  ds = ds.shuffle(seed=_seed(config.seed)).repeat()
  ds = ds.random_map(pp_lib.TrainPreprocess(config.pp), seed=_seed(config.seed, index, 1))
  ds = ds.to_iter_dataset(_read_options(config, local_batch))
  ds = SkipCorruptIterDataset(ds, limit=len(source))
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=stack_examples)
  alpha = float(config.pp.get("mixup", 0.0) or 0.0)
  if alpha > 0:
    ds = ds.random_map(pp_lib.Mixup(alpha, len(source.class_names)), seed=_seed(config.seed, index, 2))
  return _mp(ds, config), shard_size


def host_eval_dataset(config, process_index=None, process_count=None, local_batch=None):
  """(grain IterDataset of this process's eval batches with 'mask', number of batches)."""
  index, count = _processes(process_index, process_count)
  pp_lib.check_pp(config.pp)
  local_batch = local_batch or check_batch(config.batch_eval, "batch_eval", count, None)
  source = sources.open_source(config, config.pp.test)
  steps = -(-len(source) // (local_batch * count))
  start = index * steps * local_batch
  ds = grain.MapDataset.range(start, start + steps * local_batch)
  ds = ds.map(_EvalRecord(source, pp_lib.EvalPreprocess(config.pp), len(source)))
  ds = ds.to_iter_dataset(_read_options(config, local_batch)).batch(local_batch, batch_fn=stack_examples)
  return _mp(ds, config), steps


# -------------------------------------------------------------------------------- device iterators


class CorruptCounter:
  """Counts skipped images; logs the count and the first paths at the end of each epoch / eval pass."""

  def __init__(self, what, strict):
    self.what, self.strict = what, strict
    self.total = 0
    self._epoch_count, self._first = 0, []

  def add(self, notes: str):
    if not notes:
      return
    notes = notes.split("\n")
    if self.strict:
      raise UserError(f"corrupt or unreadable image in {self.what}: {notes[0]} "
                      "(strict mode; remove the file or set strict=False to skip and count such images)")
    self.total += len(notes)
    self._epoch_count += len(notes)
    self._first.extend(notes[:_FIRST_PATHS - len(self._first)])

  def report(self, when):
    if self._epoch_count:
      logging.warning("%s: skipped %d corrupt or unreadable images %s; first: %s", self.what,
                      self._epoch_count, when, "; ".join(self._first))
    self._epoch_count, self._first = 0, []


_END = object()


class DataIterator:
  """Global batches from a grain host pipeline, `prefetch` ahead in a thread; `get_state` / `set_state`.

  The state saved with a batch is grain's state right after that batch, so the state reported is always
  that of the last batch handed out, whatever is sitting in the prefetch queue.
  """

  def __init__(self, dataset, sharding, prefetch, counter, epoch_examples=None, local_batch=None):
    self._dataset, self._sharding = dataset, sharding
    self._prefetch = max(int(prefetch or 0), 0)
    self._counter, self._epoch_examples, self._local_batch = counter, epoch_examples, local_batch
    self._it = iter(dataset)
    self._state = self._it.get_state()
    self._batches = 0
    self._thread = None
    self._start()

  def _to_global(self, batch):
    notes = batch.pop("_skipped")
    notes = str(notes) if not isinstance(notes, str) else notes
    arrays = {k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v)) for k, v in batch.items()}
    return arrays, notes

  def _produce(self):
    batch = next(self._it)
    return (*self._to_global(batch), self._it.get_state())

  def _start(self):
    if not self._prefetch:
      return
    self._queue = queue.Queue(maxsize=self._prefetch)
    self._stop = threading.Event()

    def work():
      while not self._stop.is_set():
        try:
          item = self._produce()
        except StopIteration:
          item = _END
        except BaseException as e:  # pylint: disable=broad-except  # re-raised in the consumer
          item = e
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
        if item is _END or isinstance(item, BaseException):
          return

    self._thread = threading.Thread(target=work, daemon=True, name="vit_jax-data-prefetch")
    self._thread.start()

  def _halt(self):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is not None or self._prefetch:
      if self._thread is None:
        raise StopIteration
      item = self._queue.get()
      if item is _END:
        self._thread = None
        self._finish()
      if isinstance(item, BaseException):
        self._thread = None
        raise item
    else:
      try:
        item = self._produce()
      except StopIteration:
        self._finish()
    arrays, notes, self._state = item
    self._batches += 1
    self._counter.add(notes)
    if self._epoch_examples:
      seen = self._batches * self._local_batch
      if seen // self._epoch_examples > (seen - self._local_batch) // self._epoch_examples:
        self._counter.report(f"in epoch {seen // self._epoch_examples}")
    return arrays

  @property
  def num_skipped(self) -> int:
    """Corrupt or unreadable images skipped so far (handed-out batches only)."""
    return self._counter.total

  def _finish(self):
    """End of a finite (eval) pass: report skipped images, free the worker processes."""
    self._counter.report("in this evaluation pass")
    if hasattr(self._it, "close"):
      self._it.close()
    raise StopIteration

  def get_state(self) -> dict:
    """JSON-serialisable: {'grain': <grain state as a JSON string>, 'batches': int}."""
    return {"grain": json.dumps(self._state), "batches": self._batches}

  def set_state(self, state: dict):
    self._halt()
    grain_state = json.loads(state["grain"]) if isinstance(state["grain"], (str, bytes)) else state["grain"]
    self._it.set_state(grain_state)
    self._state, self._batches = grain_state, int(state["batches"])
    self._start()

  def close(self):
    self._halt()
    if hasattr(self._it, "close"):
      self._it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # interpreter shutdown
      pass


def _strict(config, strict):
  return bool(config.pp.get("strict", False)) if strict is None else strict


def make_train_iterator(config, sharding, *, process_index=None, process_count=None, strict=None):
  """Endless shuffled global training batches {'image', 'label'} sharded by `sharding`; resumable.

  `process_index`/`process_count` default to JAX's; overriding them simulates one of several processes
  (the arrays then hold only this process's batch // process_count examples).
  """
  _, count = _processes(process_index, process_count)
  local_batch = check_batch(config.batch, "batch", count, sharding)
  ds, epoch_examples = host_train_dataset(config, process_index, process_count, local_batch)
  counter = CorruptCounter(f"{config.dataset}:{config.pp.train}", _strict(config, strict))
  return DataIterator(ds, sharding, config.get("prefetch", 2), counter, epoch_examples, local_batch)


def make_eval_iterator(config, sharding, *, process_index=None, process_count=None, strict=None):
  """One pass over config.pp.test: global {'image', 'label', 'mask'} batches; padding has mask 0."""
  _, count = _processes(process_index, process_count)
  local_batch = check_batch(config.batch_eval, "batch_eval", count, sharding)
  ds, _ = host_eval_dataset(config, process_index, process_count, local_batch)
  counter = CorruptCounter(f"{config.dataset}:{config.pp.test}", _strict(config, strict))
  return DataIterator(ds, sharding, config.get("prefetch", 2), counter)
