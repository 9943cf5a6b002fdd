"""grain pipelines: host-sharded, shuffled and repeated training; exact, padded and masked evaluation.

Training reads one global order, whatever the number of processes: global position g = epoch * N + k is
example `permutation(seed, epoch)[k]` of the N-example split, global batch b holds positions [b*B, (b+1)*B),
and process p of P loads rows [p*B/P, (p+1)*B/P) of every global batch. Augmentation (crop, RandAugment) draws
from a generator seeded by (seed, g). So step s sees the same examples, augmented the same way, on 1 process or
64, and the iterator state is one number, the global batches handed out, which any topology can resume from.
Mixup / cutmix mix within a process's rows, with a generator seeded by their first position: resumes are exact
with the same number of processes (another number mixes other pairs, equally at random). A corrupt image is
replaced by the next readable example of the order (and counted), so positions never shift.

  range(local positions from the resume point) -> map(position -> example)        (grain MapDataset)
    -> to_iter_dataset(reader threads) -> batch(B/P) [-> mixup | cutmix] -> mp_prefetch(num_workers)
    -> background thread: jax.make_array_from_process_local_data -> queue of `prefetch` device batches

Evaluation pads the split to ceil(N / batch) global batches, gives each process a contiguous block of
that padded index range, and marks padding (and corrupt images) with mask 0: every process runs the same
number of steps, and every real example is scored exactly once.

Every function takes its inputs as keyword arguments (no training config), so that tools and tests call them
directly; errors still name the setting the user wrote (`batch_key`: `batch`, `batch_eval`, `--batch_size`).
"""
import math
import queue
import signal
import threading

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from vit_jax.data import preprocess as pp_lib
from vit_jax.data import sources
from vit_jax import sharding as sharding_lib
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


def setting_name(key: str) -> str:
  """How errors name a setting: a config key `batch` is `config.batch`; a flag (`--batch_size`) stays as is."""
  return key if key.startswith("-") else f"config.{key}"


def check_batch(batch: int, key: str, process_count: int, sharding) -> int:
  """Returns the per-process batch; a UserError naming `key` when the global batch cannot be split evenly."""
  name = setting_name(key)
  if not isinstance(batch, int) or batch <= 0:
    raise UserError(f"{name}={batch!r} must be a positive int")
  sharding_lib.check_divisible(name, batch, shards=data_parallel_size(sharding), processes=process_count)
  return batch // process_count


def _seed(*parts) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _read_options(read_threads, local_batch):
  # Threads overlap file reads and PIL's GIL-free decode/resize; the buffer holds preprocessed examples,
  # so it is kept near one batch rather than grain's default of 500 (300 MB of 224px float32 images).
  return grain.ReadOptions(num_threads=int(read_threads), prefetch_buffer_size=max(2 * local_batch, 8))


def _mp(ds, num_workers):
  workers = int(num_workers or 0)
  if workers < 0:
    raise UserError(f"config.num_workers={workers} must be >= 0 (0 = load in the main process)")
  if not workers:
    return ds
  if not flags.FLAGS.is_parsed():
    # grain's workers read absl flags; outside an absl app (library use, pytest) use their defaults.
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_ignore_stop_signals)


def _ignore_stop_signals(worker_index, worker_count):
  """In each worker: a Ctrl-C or scheduler SIGTERM reaches the whole process group, and the trainer saves and stops
  on it; workers that died of it first would fail that save. grain stops its workers itself."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ------------------------------------------------------------------------------------ grain pieces


def stack_examples(examples):
  """batch_fn: stacks arrays; joins the corrupt-image notes into one string (one leaf, cheap to ship)."""
  out = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "_skipped"}
  out["_skipped"] = "\n".join(e["_skipped"] for e in examples if e["_skipped"])
  return out


class _TrainRecord:
  """Picklable: local position of process p -> its training example from the global order (module docstring)."""

  def __init__(self, source, preprocess, seed, global_batch, local_batch, process_index):
    self.source, self.preprocess, self.seed = source, preprocess, seed
    self.global_batch, self.local_batch, self.process_index = global_batch, local_batch, process_index
    self._orders = {}

  def order(self, epoch):
    """The permutation of epoch `epoch`, cached for the newest three epochs. Reader threads call this at once, and
    a batch as large as the split spans epochs: no check-then-act on the shared cache (an evicted epoch that is
    still read is computed again, the same permutation)."""
    order = self._orders.get(epoch)
    if order is None:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
      self._orders[epoch] = order
      for old in sorted(self._orders.copy())[:-3]:  # dict.copy is atomic under the GIL; iterating the dict is not
        self._orders.pop(old, None)
    return order

  def global_position(self, local_position):
    batch, row = divmod(local_position, self.local_batch)
    return batch * self.global_batch + self.process_index * self.local_batch + row

  def __call__(self, local_position):
    position = self.global_position(local_position)
    skipped = []
    for attempt in range(len(self.source)):
      epoch, k = divmod(position + attempt, len(self.source))
      example = self.preprocess(self.source[int(self.order(epoch)[k])],
                                np.random.default_rng([self.seed, position, attempt]))
      if not example["_skipped"]:
        return dict(example, _skipped="\n".join(skipped), _position=np.int64(position))
      skipped.append(example["_skipped"])
    raise UserError(f"no readable image in split {self.source.description!r}, e.g. {skipped[0]}")


class _MixBatch:
  """Picklable batch op: mixup / cutmix with a generator seeded by the batch's first global position."""

  def __init__(self, mix, seed):
    self.mix, self.seed = mix, seed

  def __call__(self, batch):
    return self.mix(batch, np.random.default_rng([self.seed, int(batch["_position"][0]), 2]))


class _EvalRecord:
  """Picklable index -> eval example; indices past the split are padding."""

  def __init__(self, source, preprocess, num_examples):
    self.source, self.preprocess, self.num_examples = source, preprocess, num_examples

  def __call__(self, index):
    if index >= self.num_examples:
      return self.preprocess.padding()
    return self.preprocess(self.source[index])


_ENDLESS = 2**62  # local positions: training repeats epochs for as long as it is iterated


def _train_dataset(source, pp, *, seed, local_batch, process_index, process_count, start_batch, num_workers,
                   read_threads):
  """This process's rows of global batches `start_batch`, `start_batch` + 1, ... of an opened source."""
  record = _TrainRecord(source, pp_lib.TrainPreprocess(pp), _seed(seed), local_batch * process_count, local_batch,
                        process_index)
  ds = grain.MapDataset.range(start_batch * local_batch, _ENDLESS).map(record)
  ds = ds.to_iter_dataset(_read_options(read_threads, local_batch))
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=stack_examples)
  mix = pp_lib.MixBatch.from_pp(pp, len(source.class_names))
  if mix is not None:
    ds = ds.map(_MixBatch(mix, _seed(seed)))
  return _mp(ds, num_workers)


def _open_train_source(dataset, split, tfds_data_dir, global_batch, batch_key):
  source = sources.open_source(dataset, split, tfds_data_dir=tfds_data_dir)
  if len(source) < global_batch:
    raise UserError(f"split {source.description!r} has {len(source)} examples, fewer than one batch of "
                    f"{global_batch}; lower {setting_name(batch_key)}")
  return source


def host_train_dataset(*, dataset, split, pp, batch, seed, tfds_data_dir=None, num_workers=0, read_threads=2,
                       start_batch=0, process_index=None, process_count=None, batch_key="batch"):
  """(grain IterDataset of this process's rows of global batches `start_batch`, `start_batch` + 1, ...,
  examples per epoch on this process): the host side alone, without devices (tests, the data benchmark)."""
  index, count = _processes(process_index, process_count)
  pp_lib.check_pp(pp)
  local_batch = check_batch(batch, batch_key, count, None)
  source = _open_train_source(dataset, split, tfds_data_dir, local_batch * count, batch_key)
  ds = _train_dataset(source, pp, seed=seed, local_batch=local_batch, process_index=index, process_count=count,
                      start_batch=start_batch, num_workers=num_workers, read_threads=read_threads)
  return ds, len(source) // count


def _eval_dataset(source, pp, *, local_batch, process_index, process_count, num_workers, read_threads):
  steps = -(-len(source) // (local_batch * process_count))
  start = process_index * steps * local_batch
  ds = grain.MapDataset.range(start, start + steps * local_batch)
  ds = ds.map(_EvalRecord(source, pp_lib.EvalPreprocess(pp), len(source)))
  ds = ds.to_iter_dataset(_read_options(read_threads, local_batch)).batch(local_batch, batch_fn=stack_examples)
  return _mp(ds, num_workers), steps


def host_eval_dataset(*, dataset, split, pp, batch, tfds_data_dir=None, num_workers=0, read_threads=2,
                      process_index=None, process_count=None, batch_key="batch_eval"):
  """(grain IterDataset of this process's eval batches with 'mask', number of batches): the host side alone."""
  index, count = _processes(process_index, process_count)
  pp_lib.check_pp(pp)
  local_batch = check_batch(batch, batch_key, count, None)
  source = sources.open_source(dataset, split, tfds_data_dir=tfds_data_dir)
  return _eval_dataset(source, pp, local_batch=local_batch, process_index=index, process_count=count,
                       num_workers=num_workers, read_threads=read_threads)


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

  `make_dataset(start_batch)` builds the host pipeline from global batch `start_batch` on, so the state is the
  number of batches handed out (not what sits in the prefetch queue), and restoring it rebuilds the pipeline
  there: no replay, and the same state works on any number of processes.
  """

  def __init__(self, make_dataset, sharding, prefetch, counter, epoch_examples=None, local_batch=None):
    self._make_dataset, self._sharding = make_dataset, sharding
    self._prefetch = max(int(prefetch or 0), 0)
    self._counter, self._epoch_examples, self._local_batch = counter, epoch_examples, local_batch
    self._batches = 0
    self._it = iter(make_dataset(0))
    self._thread = None
    self._start()

  def _produce(self):
    batch = next(self._it)
    notes = batch.pop("_skipped")
    notes = str(notes) if not isinstance(notes, str) else notes
    batch.pop("_position", None)
    arrays = {k: jax.make_array_from_process_local_data(self._sharding, np.asarray(v)) for k, v in batch.items()}
    return arrays, notes

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
    arrays, notes = item
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
    """JSON-serialisable: {'batches': global batches handed out}."""
    return {"batches": self._batches}

  def set_state(self, state: dict):
    self.close()
    self._batches = int(state["batches"])
    self._it = iter(self._make_dataset(self._batches))
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


def _strict(pp, strict):
  return bool(pp.get("strict", False)) if strict is None else bool(strict)


def make_train_iterator(*, dataset, split, pp, batch, seed, sharding, tfds_data_dir=None, num_workers=0,
                        read_threads=2, prefetch=2, process_index=None, process_count=None, strict=None,
                        batch_key="batch") -> DataIterator:
  """Endless shuffled global training batches {'image', 'label'} sharded by `sharding`; resumable.

  `batch` is global. `process_index`/`process_count` default to JAX's; overriding them simulates one of several
  processes (the arrays then hold only this process's batch // process_count examples). `strict=None` takes
  `pp['strict']` (default False: corrupt images are skipped and counted).
  """
  index, count = _processes(process_index, process_count)
  pp_lib.check_pp(pp)
  local_batch = check_batch(batch, batch_key, count, sharding)
  # Opened once: every resume point (set_state) rebuilds only the grain pipeline over the same source.
  source = _open_train_source(dataset, split, tfds_data_dir, batch, batch_key)
  make_dataset = lambda start: _train_dataset(
      source, pp, seed=seed, local_batch=local_batch, process_index=index, process_count=count,
      start_batch=start, num_workers=num_workers, read_threads=read_threads)
  counter = CorruptCounter(f"{dataset}:{split}", _strict(pp, strict))
  return DataIterator(make_dataset, sharding, prefetch, counter, len(source) // count, local_batch)


def make_eval_iterator(*, dataset, split, pp, batch, sharding, tfds_data_dir=None, num_workers=0, read_threads=2,
                       prefetch=2, process_index=None, process_count=None, strict=None,
                       batch_key="batch_eval") -> DataIterator:
  """One pass over `split`: global {'image', 'label', 'mask'} batches of `batch`; padding has mask 0."""
  index, count = _processes(process_index, process_count)
  pp_lib.check_pp(pp)
  local_batch = check_batch(batch, batch_key, count, sharding)
  source = sources.open_source(dataset, split, tfds_data_dir=tfds_data_dir)
  ds, _ = _eval_dataset(source, pp, local_batch=local_batch, process_index=index, process_count=count,
                        num_workers=num_workers, read_threads=read_threads)
  counter = CorruptCounter(f"{dataset}:{split}", _strict(pp, strict))
  return DataIterator(lambda start: ds, sharding, prefetch, counter)
