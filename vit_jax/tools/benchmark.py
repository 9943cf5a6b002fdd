"""Speed of the real train step (or inference) of a registry model, with model-FLOPs utilisation.

  python -m vit_jax.tools.benchmark --model_name=ViT-B_16 --image_size=224 --batch=256 --mode=train --dtype=bfloat16
  python -m vit_jax.tools.benchmark --model_name=ViT-L_16 --batch=0 --remat=full --mesh.fsdp=-1 --mesh.data=1
  python -m vit_jax.tools.benchmark --model_name=BiT-R50x1 --image_size=224 --batch=32 --mode=infer
  python -m vit_jax.tools.benchmark --model_name=ViT-B_16 --image_size=224 --batch=64 --trainer=mae --mask_ratio=0.75

Speed is only comparable against a ceiling measured the same way on the same machine, so the step is the one
training compiles (`vit_jax.steps`) and the ceiling a matmul measured in the same run; measured figures live in
docs/benchmarks.md. Prints one JSON line: compile time, median step time over `--steps` after `--warmup`, img/s,
achieved FLOP/s, MFU against the ceiling (`flops.peak_flops`: a large matmul in the same dtype with float32
accumulation, the way the model computes, times the devices), peak device memory from XLA's memory analysis, the
analytic FLOP count next to XLA's own cost analysis, and the allocator the process runs with.

`--batch=0` first finds the largest global batch whose step fits in device memory (XLA's peak from compiling, no
step run; `largest_batch`), then benchmarks it; the JSON says which batches were tried.

Every family runs (ViTs, BiT ResNets, the course CNN, whose train step updates its BatchNorm statistics); the
ViT-only flags (`--patch`, `--remat`, `--scan_layers`, `--fused_attention`) with a convolutional model are an error.
The FLOPs are `vit_jax.flops`' analytic count of convolutions and matmuls for every family. `--trainer=mae` or
`masked_patch` times the self-supervised train step instead (the objective's defaults: MAE's decoder 512 x 8);
MAE's FLOPs count the encoder on the visible patches only, so the `xla_gflops_per_step` beside them shows the
cost falling with `--mask_ratio`.

`--peer_python=.peer/bin/python` also runs the timm peer on the same shape right after, for a side-by-side ratio, in
the environment the benchmark was started with (`vit_jax.host.allocator` restores it after choosing ours; start the
benchmark with `LD_PRELOAD` set to give both the same allocator). A ViT's peer is `timm_bench.py` in `--peer_dir`
(default `$VIT_JAX_PEER_DIR`); a BiT's is `TIMM_CNN_PEER` below, the same step (Adam, cross-entropy, bf16 autocast
for `--dtype=bfloat16`) on timm's `resnetv2_*_bit` with the venv's torchvision stand-in from `--peer_dir`, and
`--peer_compile` runs it under `torch.compile`.
"""
import dataclasses
import json
import os
import statistics
import subprocess
import time
from typing import Any, Optional

from absl import flags, logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import flops, host, models, objectives, optim, sharding, steps
from vit_jax.errors import UserError
from vit_jax.host import allocator
from vit_jax.models import precision, vit
from vit_jax.tools import cli

FLAGS = flags.FLAGS
MODES = ("train", "infer")
# The allocator's fragmentation and the runtime's workspaces (cuDNN) are not in XLA's peak: keep 5% free.
DEVICE_LIMIT_FRACTION = 0.95
SEARCH_TOLERANCE = 1 / 32  # the largest batch is searched to within ~3%
PEER_DIR_VARIABLE = "VIT_JAX_PEER_DIR"
# Registry models with a timm twin of the same shapes, for --peer_python.
TIMM_NAMES = {"ViT-Ti_16": "vit_tiny_patch16_224", "ViT-S_16": "vit_small_patch16_224",
              "ViT-B_16": "vit_base_patch16_224", "ViT-L_16": "vit_large_patch16_224",
              **{f"BiT-R{depth}x{width}": f"resnetv2_{depth}x{width}_bit"
                 for depth, width in ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))}}
PEER_NUM_CLASSES = 10  # the head of timm_bench.py (the ViT peer)
# The ViT-only benchmark flags and their off values.
VIT_FLAGS = {"patch": 0, "remat": "none", "scan_layers": False, "fused_attention": False}


def define_flags():
  """Flags of this tool, defined only when it runs."""
  cli.define_flags("model_name", "image_size", "batch", "num_classes", "dtype", "optimizer", "remat", "mesh",
                   "cpu_devices", model_name="ViT-B_16", image_size=224, batch=64)
  flags.DEFINE_integer("patch", 0, "Override the patch size (0 keeps the model's), e.g. 4 for a 32 px ViT-Ti.")
  flags.DEFINE_enum("mode", "train", MODES, "Benchmark the train step or inference.")
  flags.DEFINE_enum("trainer", "supervised", list(objectives.OBJECTIVES), "The train step's objective (--mode=train): "
                    "supervised, or self-supervised pretraining (masked_patch; mae, whose encoder sees the visible "
                    "patches only) with its default settings.")
  flags.DEFINE_float("mask_ratio", 0.75, "--trainer=mae: the share of patches hidden from the encoder.")
  flags.DEFINE_bool("scan_layers", False, "Scan over encoder layers (faster compiles of deep models).")
  flags.DEFINE_bool("fused_attention", False, "jax.nn.dot_product_attention (cuDNN flash attention on GPU).")
  flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_float("memory_limit_gib", None, "With --batch=0: the memory per device a batch must fit in (default: "
                     f"{DEVICE_LIMIT_FRACTION:.0%} of what the accelerator reports; CPUs report nothing).")
  flags.DEFINE_bool("compile_only", False, "Only compile (compile time and memory of deep models); no steps.")
  flags.DEFINE_string("peer_python", None, "Python of a torch+timm venv: also run the timm peer on this shape.")
  flags.DEFINE_string("peer_dir", None, f"Folder of the timm peer (timm_bench.py, tv_stub/); default: "
                      f"${PEER_DIR_VARIABLE}.")
  flags.DEFINE_bool("peer_compile", False, "Run the timm peer under torch.compile (BiT models; the ViT peer, "
                    "timm_bench.py, runs eagerly).")


# --- measuring helpers ---------------------------------------------------------------------------------------


def time_steps(run, warmup, num_steps):
  for _ in range(warmup):
    run()
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_stats(compiled):
  """(XLA's FLOP count, bytes per device) of a compiled executable; None where the backend does not say.

  The bytes are arguments + outputs - donated + temporaries: what the executable holds at once (XLA allocates
  its temporaries as one block). XLA's own `peak_memory_in_bytes` leaves the temporaries out on CPU.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
  memory = compiled.memory_analysis()
  peak = None
  if memory is not None:
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes)
  return xla_flops, peak


def _significant(x, digits=4):
  return float(f"{x:.{digits}g}")


def memory_limit_bytes(limit_gib):
  """Bytes a batch may take per device: `limit_gib`, else a fraction of what the device reports."""
  if limit_gib is not None:
    if limit_gib <= 0:
      raise UserError(f"--memory_limit_gib={limit_gib} must be positive")
    return int(limit_gib * 2**30)
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    raise UserError(f"--batch=0 needs --memory_limit_gib here: {device.platform} devices report no memory limit")
  return int(DEVICE_LIMIT_FRACTION * stats["bytes_limit"])


def largest_batch(peak_bytes, *, step, limit, tolerance=SEARCH_TOLERANCE, max_tries=12):
  """(largest multiple of `step` whose `peak_bytes(batch)` is at most `limit`, {batch: peak} of those tried).

  Peak memory is close to affine in the batch, so each guess is the affine fit through the two known points
  nearest the limit; it is kept inside the middle half of a known bracket so that the bracket always shrinks.
  The search stops once the smallest batch that does not fit is within `tolerance` (or one step) of the largest
  that does: 4-8 compilations where doubling and then bisecting takes ~15-20 (and never more than `max_tries`).
  """
  tried = {}

  def fits(batch):
    tried[batch] = peak_bytes(batch)
    return tried[batch] <= limit

  if not fits(step):
    raise UserError(f"even batch={step} (one example per data-parallel device) needs "
                    f"{tried[step] / 2**30:.2f} GiB per device, over the {limit / 2**30:.2f} GiB limit; "
                    "try --remat=full, --mesh.fsdp or a smaller --image_size")
  lo, hi = step, None
  if not fits(2 * step):
    return lo, tried
  lo = 2 * step
  while (hi is None or hi - lo > max(step, tolerance * lo)) and len(tried) < max_tries:
    # The affine fit through lo and the nearest other point tried.
    other = hi if hi is not None else max(b for b in tried if b < lo)
    slope = (tried[other] - tried[lo]) / (other - lo)
    guess = lo + (limit - tried[lo]) / slope if slope > 0 else 2 * lo
    if hi is None:
      guess = min(max(guess, lo * (1 + tolerance)), 64 * lo)
    else:
      quarter = (hi - lo) / 4
      guess = min(max(guess, lo + quarter), hi - quarter)
    guess = min(max(int(guess) // step * step, lo + step), hi - step if hi is not None else float("inf"))
    if fits(guess):
      lo = guess
    else:
      hi = guess
  return lo, tried


# --- config and model ----------------------------------------------------------------------------------------


def check_args(args, model_config):
  """UserErrors for flags that cannot work together, before anything compiles."""
  if models.family(model_config) != "vit":
    used = [f"--{name}" if value is True else f"--{name}={value}" for name, value in
            ((name, getattr(args, name)) for name in VIT_FLAGS) if value != VIT_FLAGS[name]]
    if used:
      raise UserError(f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} for Vision Transformers, not for "
                      f"{models.family_description(model_config)}; drop {'it' if len(used) == 1 else 'them'}")
  if args.batch < 0:
    raise UserError(f"--batch={args.batch} must be positive, or 0 for the largest batch that fits")
  if args.batch == 0 and args.peer_python:
    raise UserError("--batch=0 and --peer_python together: pass the batch the peer should run with")
  if args.trainer != "supervised":
    if args.mode != "train":
      raise UserError(f"--trainer={args.trainer} is a training objective; use it with --mode=train")
    if args.peer_python:
      raise UserError(f"--peer_python runs timm's supervised step, no peer for --trainer={args.trainer}; drop one")
    objective(args).check_model(model_config, args.image_size)


def objective(args):
  """The train step's objective: `--trainer` with its default settings (`--mask_ratio` for MAE)."""
  if args.trainer == "mae":
    return objectives.MAE(mask_ratio=args.mask_ratio)
  return objectives.get(args.trainer)()


def make_model(args):
  """(model at float32, its model config): the registry model with the benchmark's speed options and patch (ViTs;
  `check_args` has refused them for the other families)."""
  overrides = {}
  if models.family(models.get_model_config(args.model_name)) == "vit":
    overrides = dict(remat=args.remat, scan_layers=args.scan_layers, fused_attention=args.fused_attention)
    if args.patch:
      overrides["patches"] = dict(size=(args.patch, args.patch))
  model_config = models.get_model_config(args.model_name, **overrides)
  return models.build(model_config, num_classes=args.num_classes), model_config


def make_mesh(args, model):
  """The mesh of `--mesh.*`; on a CPU host the cores are split into devices first (`--cpu_devices`)."""
  mesh_config = cli.mesh_config()
  host.split_cpu_devices(args.cpu_devices, num_params=lambda: steps.count_params(model, args.image_size),
                         batch_sizes=(args.batch,) if args.batch else (),
                         mesh_sizes=[mesh_config[axis] for axis in sharding.MESH_AXES])
  return sharding.make_mesh(mesh_config)


@dataclasses.dataclass
class Step:
  """The jitted function benchmarked (train step or forward) and the shapes and shardings of its state."""
  fn: Any
  init_fn: Any
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings: compiles without materialising anything
  mode: str

  def lower(self, images, labels):
    if self.mode == "train":
      return self.fn.lower(self.abstract_state, {"image": images, "label": labels})
    return self.fn.lower(self.abstract_state.variables(), images)


def make_step(args, model, mesh):
  """The train step of `vit_jax.steps` (`--trainer`'s objective, supervised softmax cross-entropy by default,
  `--optimizer`; BatchNorm normalises with the batch and updates its statistics) or the forward pass (on the
  parameters and the model's state)."""
  tx, schedule = optim.make_optimizer(
      optimizer=args.optimizer, base_lr=1e-3, total_steps=1000, warmup_steps=10, decay_type="cosine",
      weight_decay=0.0 if args.optimizer == "sgd" else 0.1, grad_norm_clip=1.0)
  train_objective = objective(args)
  model = train_objective.wrap(model) if args.mode == "train" else model
  init_fn = steps.make_init_fn(model, tx, args.image_size)
  abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_shardings = sharding.tree_shardings(abstract_state, mesh)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                                state_shardings)
  if args.mode == "train":
    fn = steps.make_train_step(model, tx, schedule, train_objective.loss_fn, mesh=mesh,
                               state_shardings=state_shardings)
  else:
    fn = jax.jit(lambda variables, x: model.apply(variables, x, train=False),
                 in_shardings=(state_shardings.variables(), sharding.batch_sharding(mesh)))
  return Step(fn=fn, init_fn=init_fn, state_shardings=state_shardings, abstract_state=abstract_state,
              mode=args.mode)


# --- compile and batch search --------------------------------------------------------------------------------


class Compilations:
  """Compiled executables by global batch (compiled from shapes alone), with their compile times."""

  def __init__(self, step: Step, mesh, image_size):
    self.step, self.mesh, self.image_size = step, mesh, image_size
    self.compiled = {}  # batch -> (executable, seconds)

  def __call__(self, batch):
    if batch not in self.compiled:
      sharding.check_batch_size("batch", batch, self.mesh)
      batch_sharding = sharding.batch_sharding(self.mesh)
      images = jax.ShapeDtypeStruct((batch, self.image_size, self.image_size, 3), jnp.float32,
                                    sharding=batch_sharding)
      labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)
      start = time.perf_counter()
      compiled = self.step.lower(images, labels).compile()
      self.compiled[batch] = compiled, time.perf_counter() - start
    return self.compiled[batch]

  def keep_only(self, batch):
    """Frees every executable but `batch`'s (before running it)."""
    self.compiled = {batch: self.compiled[batch]}


def choose_batch(args, compilations: Compilations, mesh):
  """(global batch, the search's record or None): `--batch`, or with `--batch=0` the largest that fits."""
  if args.batch:
    return args.batch, None
  limit = memory_limit_bytes(args.memory_limit_gib)

  def peak_bytes(batch):
    peak = compiled_stats(compilations(batch)[0])[1]
    if peak is None:
      raise UserError(f"--batch=0 needs XLA's memory analysis, which {jax.devices()[0].platform} does not give")
    return peak

  batch, tried = largest_batch(peak_bytes, step=sharding.num_batch_shards(mesh), limit=limit)
  compilations.keep_only(batch)
  search = {"memory_limit_mib": round(limit / 2**20, 1),
            "tried": [{"batch": b, "peak_memory_mib": round(p / 2**20, 1), "fits": p <= limit}
                      for b, p in sorted(tried.items())]}
  return batch, search


def compile_report(args, *, model_config, mesh, dtype_name, batch, compiled, compile_s, flops_per_image,
                   allocator_name):
  """What is known without running a step: the setup, compile time, FLOP counts and peak memory."""
  xla_flops, peak_bytes = compiled_stats(compiled)
  return {
      "model": args.model_name, "family": models.family(model_config), "mode": args.mode, "dtype": dtype_name,
      "image_size": args.image_size, "patch": model_config.patches.size[0] if "patches" in model_config else None,
      "batch": batch, "remat": args.remat,
      "scan_layers": args.scan_layers, "fused_attention": args.fused_attention, "trainer": args.trainer,
      "mesh": dict(mesh.shape),
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "allocator": allocator.describe(allocator_name),  # what holds XLA:CPU's buffers (vit_jax.host.allocator)
      "compile_s": round(compile_s, 2), "model_gflops_per_step": round(flops_per_image * batch / 1e9, 2),
      # XLA costs one partition of the SPMD program: times the devices for the whole step. It counts a scanned
      # loop's body once, so with scan_layers its count is not the step's.
      "xla_gflops_per_step": (None if xla_flops is None or args.scan_layers
                              else round(xla_flops * mesh.size / 1e9, 2)),
      "peak_memory_mib": None if peak_bytes is None else round(peak_bytes / 2**20, 1),
  }


# --- run -----------------------------------------------------------------------------------------------------


def run_report(args, *, step: Step, compiled, mesh, dtype_name, batch, flops_per_image):
  """Median step time over `--steps` on random data, img/s, achieved FLOP/s and MFU."""
  batch_sharding = sharding.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.uniform(-1, 1, (batch, args.image_size, args.image_size, 3)).astype(np.float32),
                          batch_sharding)
  labels = jax.device_put(rng.integers(0, args.num_classes, batch).astype(np.int32), batch_sharding)
  state = [jax.jit(step.init_fn, out_shardings=step.state_shardings)(jax.random.PRNGKey(0))]

  def run():
    if step.mode == "train":
      state[0], metrics = compiled(state[0], {"image": images, "label": labels})
      jax.block_until_ready(metrics)
    else:
      compiled(state[0].variables(), images).block_until_ready()

  step_s = time_steps(run, args.warmup, args.steps)
  peak = flops.peak_flops(precision.DTYPES[dtype_name], mesh.size)
  achieved = flops_per_image * batch / step_s
  return {"step_ms": round(step_s * 1e3, 2), "img_per_sec": round(batch / step_s, 1),
          "tflops_per_sec": _significant(achieved / 1e12), "peak_tflops_per_sec": _significant(peak / 1e12),
          "mfu": _significant(achieved / peak)}


def benchmark(args, allocator_name: Optional[str] = None):
  """The benchmark's JSON record; `allocator_name` is what `host.restart_with_fast_allocator` returned."""
  check_args(args, models.get_model_config(args.model_name))
  model, model_config = make_model(args)
  mesh = make_mesh(args, model)
  platform = mesh.devices.flat[0].platform
  dtype_name = precision.resolve_dtype(args.dtype, platform)
  peer = peer_command(args, dtype_name, model_config) if args.peer_python else None  # checked before the long part
  model = model.clone(dtype=precision.DTYPES[dtype_name])
  vit.warn_if_remat_saves_nothing(args.remat, args.scan_layers, platform)
  step = make_step(args, model, mesh)
  compilations = Compilations(step, mesh, args.image_size)
  batch, search = choose_batch(args, compilations, mesh)
  compiled, compile_s = compilations(batch)
  flops_per_image = objective(args).train_flops_per_image(model_config, args.image_size, args.num_classes)
  if args.mode == "infer":
    flops_per_image /= 3  # forward only
  result = compile_report(args, model_config=model_config, mesh=mesh, dtype_name=dtype_name, batch=batch,
                          compiled=compiled, compile_s=compile_s, flops_per_image=flops_per_image,
                          allocator_name=allocator_name)
  if search:
    result["batch_search"] = search
  if args.compile_only:
    return result
  result.update(run_report(args, step=step, compiled=compiled, mesh=mesh, dtype_name=dtype_name, batch=batch,
                           flops_per_image=flops_per_image))
  if peer:
    result["peer"] = run_peer(*peer)
    result["speedup_vs_peer"] = round(result["img_per_sec"] / result["peer"]["img_per_sec"], 2)
  return result


# --- the timm peer -------------------------------------------------------------------------------------------


def peer_dir(args):
  """The timm peer's folder: `--peer_dir`, else `$VIT_JAX_PEER_DIR`; a UserError when neither names one."""
  directory = args.peer_dir or os.environ.get(PEER_DIR_VARIABLE)
  if not directory:
    raise UserError(f"--peer_python needs the timm peer's folder (timm_bench.py, tv_stub/): pass --peer_dir=DIR or "
                    f"set {PEER_DIR_VARIABLE}=DIR")
  if not os.path.exists(os.path.join(directory, "timm_bench.py")):
    raise UserError(f"timm peer script not found in {directory} (no timm_bench.py); pass the peer's folder with "
                    f"--peer_dir or {PEER_DIR_VARIABLE}")
  return directory


# The BiT peer: timm_bench.py builds ViTs only (it passes img_size and patch_size), so the same step on timm's
# `resnetv2_*_bit` runs from here, in the peer's venv. argv[1]: JSON of name, num_classes, mode, dtype (f32|bf16),
# batch, image_size, steps, warmup, compile. Prints one JSON line, as timm_bench.py does.
TIMM_CNN_PEER = r"""
import json, sys, time
import timm, torch
a = json.loads(sys.argv[1])
torch.manual_seed(0)
model = timm.create_model(a["name"], pretrained=False, num_classes=a["num_classes"])
forward = torch.compile(model) if a["compile"] else model
x = torch.rand(a["batch"], 3, a["image_size"], a["image_size"]) * 2 - 1
y = torch.randint(0, a["num_classes"], (a["batch"],))
opt = torch.optim.Adam(model.parameters(), lr=1e-4)
autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=a["dtype"] == "bf16")

def step():
  if a["mode"] == "train":
    model.train(); opt.zero_grad(set_to_none=True)
    with autocast():
      loss = torch.nn.functional.cross_entropy(forward(x), y)
    loss.backward(); opt.step()
  else:
    model.eval()
    with torch.inference_mode(), autocast():
      forward(x)

start = time.perf_counter(); step(); first_s = time.perf_counter() - start
for _ in range(a["warmup"] - 1): step()
times = []
for _ in range(a["steps"]):
  start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
times.sort(); median = times[len(times) // 2]
print(json.dumps({"peer": "timm", "name": a["name"], "mode": a["mode"], "dtype": a["dtype"], "batch": a["batch"],
                  "image_size": a["image_size"], "compiled": a["compile"], "first_step_s": round(first_s, 2),
                  "params": sum(p.numel() for p in model.parameters()), "step_ms": round(median * 1e3, 1),
                  "img_per_sec": round(a["batch"] / median, 1), "threads": torch.get_num_threads()}))
"""


def peer_command(args, dtype_name, model_config):
  """(command, environment) that runs the timm peer on the benchmark's shape and dtype (`dtype_name`: float32 or
  bfloat16, bf16 autocast for timm), in its own venv: torch is never our dependency."""
  directory = peer_dir(args)
  timm_dtype = {"float32": "f32", "bfloat16": "bf16"}[dtype_name]
  env = dict(os.environ, PYTHONPATH=os.path.join(directory, "tv_stub"))
  twins = f"use one of {', '.join(TIMM_NAMES)} with --peer_python"
  if models.family(model_config) != "vit":
    if args.model_name not in TIMM_NAMES:
      raise UserError(f"no timm twin for {args.model_name}; {twins}")
    options = dict(name=TIMM_NAMES[args.model_name], num_classes=args.num_classes, mode=args.mode, dtype=timm_dtype,
                   batch=args.batch, image_size=args.image_size, steps=args.steps, warmup=max(args.warmup, 1),
                   compile=args.peer_compile)
    return [args.peer_python, "-c", TIMM_CNN_PEER, json.dumps(options)], env
  if args.peer_compile:
    raise UserError(f"--peer_compile is for the BiT peer; the ViT peer of {args.model_name} (timm_bench.py) runs "
                    "eagerly: drop --peer_compile")
  if args.num_classes != PEER_NUM_CLASSES:
    raise UserError(f"the timm peer script trains {PEER_NUM_CLASSES} classes; pass --num_classes={PEER_NUM_CLASSES} "
                    f"(not {args.num_classes})")
  if args.model_name not in TIMM_NAMES:
    raise UserError(f"no timm twin for {args.model_name}; {twins}")
  command = [args.peer_python, os.path.join(directory, "timm_bench.py"), "--mode", args.mode, "--dtype", timm_dtype,
             "--batch", str(args.batch), "--image_size", str(args.image_size), "--patch", str(args.patch or 16),
             "--name", TIMM_NAMES[args.model_name], "--steps", str(args.steps), "--warmup", str(args.warmup)]
  return command, env


def run_peer(command, env):
  """The timm peer's JSON line."""
  result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  if result.returncode:
    shown = " ".join("TIMM_CNN_PEER" if part == TIMM_CNN_PEER else part for part in command)
    raise UserError(f"the timm peer failed ({shown}): {result.stderr.strip().splitlines()[-1:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(allocator_name=None):
  logging.set_verbosity(logging.WARNING)
  print(json.dumps(benchmark(FLAGS, allocator_name)), flush=True)


if __name__ == "__main__":
  restarted_with = host.restart_with_fast_allocator()  # first: the new process starts over
  define_flags()
  cli.run(lambda: main(restarted_with))
