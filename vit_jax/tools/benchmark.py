"""Speed of the real train step (or inference) of a registry model, with model-FLOPs utilisation.

  python -m vit_jax.benchmark --model_name=ViT-B_16 --image_size=224 --batch=256 --mode=train --dtype=bfloat16

Prints one JSON line: compile time, median step time over `--steps` after `--warmup`, img/s, achieved FLOP/s,
MFU against a ceiling measured in the same run (`flops.peak_flops`: a large matmul in the same dtype with float32
accumulation, the way the model computes, times the devices), peak device memory from XLA's memory analysis, and
the analytic FLOP count next to XLA's own cost analysis. `--peer_python=.peer/bin/python` also runs the timm peer
(../shared/peer/timm_bench.py) on the same shape right after, for a side-by-side ratio, in the environment the
benchmark was started with (`vit_jax.allocator` restores it after choosing ours; start the benchmark with
`LD_PRELOAD` set to give both the same allocator).

  python -m vit_jax.benchmark --model_name=ViT-L_16 --batch=0 --remat=full --mesh.fsdp=-1 --mesh.data=1

`--batch=0` first finds the largest global batch whose step fits in device memory (XLA's peak from compiling, no
step run; `largest_batch`), then benchmarks it; the JSON says which batches were tried.
"""
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import allocator, compute_dtype, cpu_devices, flops, models, optim, sharding, train
from vit_jax.errors import UserError, run_cli

MODES = ("train", "infer")
# The allocator's fragmentation and the runtime's workspaces (cuDNN) are not in XLA's peak: keep 5% free.
DEVICE_LIMIT_FRACTION = 0.95
SEARCH_TOLERANCE = 1 / 32  # the largest batch is searched to within ~3%
FLAGS = flags.FLAGS
flags.DEFINE_string("model_name", "ViT-B_16", "Registry model name.")
flags.DEFINE_integer("image_size", 224, "Square input size in pixels.")
flags.DEFINE_integer("patch", 0, "Override the patch size (0 keeps the model's), e.g. 4 for a 32 px ViT-Ti.")
flags.DEFINE_integer("batch", 64, "Global batch size; 0: the largest that fits in device memory (searched by "
                     "compiling; see --memory_limit_gib).")
flags.DEFINE_integer("num_classes", 1000, "Classes of the head.")
flags.DEFINE_enum("mode", "train", MODES, "Benchmark the train step or inference.")
flags.DEFINE_enum("dtype", compute_dtype.AUTO, list(compute_dtype.CHOICES), "Compute dtype (parameters stay "
                  "float32); auto: bfloat16 on GPU/TPU and CPUs with bf16 units, else float32 (as training does).")
flags.DEFINE_enum("optimizer", "sgd", list(optim.OPTIMIZERS), "Optimizer of the train step.")
flags.DEFINE_enum("remat", "none", list(models.REMAT_POLICIES), "Rematerialisation policy per encoder block.")
flags.DEFINE_bool("scan_layers", False, "Scan over encoder layers (faster compiles of deep models).")
flags.DEFINE_bool("fused_attention", False, "jax.nn.dot_product_attention (cuDNN flash attention on GPU).")
flags.DEFINE_integer("mesh.data", -1, "Mesh size of the data axis (-1: the remaining devices).")
flags.DEFINE_integer("mesh.fsdp", 1, "Mesh size of the fsdp axis.")
flags.DEFINE_integer("mesh.tensor", 1, "Mesh size of the tensor axis.")
cpu_devices.define_flag()
flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_float("memory_limit_gib", None, "With --batch=0: the memory per device a batch must fit in (default: "
                   f"{DEVICE_LIMIT_FRACTION:.0%} of what the accelerator reports; CPUs report nothing).")
flags.DEFINE_bool("compile_only", False, "Only compile (compile time and memory of deep models); no steps.")
flags.DEFINE_string("peer_python", None, "Python of a torch+timm venv: also run the timm peer on this shape.")


def step_config(args):
  """The train-step keys of the config contract, with the benchmark's values."""
  return ml_collections.ConfigDict(dict(
      batch=args.batch, accum_steps=1, loss="softmax_xent", label_smoothing=0.0, optimizer=args.optimizer,
      momentum=0.9, beta2=0.999, momentum_dtype="float32", weight_decay=0.0 if args.optimizer == "sgd" else 0.1,
      grad_norm_clip=1.0, base_lr=1e-3, total_steps=1000, warmup_steps=10, decay_type="cosine",
      pp=dict(crop=args.image_size),
      mesh={axis: args[f"mesh.{axis}"].value for axis in sharding.MESH_AXES}))


def model_overrides(args):
  overrides = dict(remat=args.remat, scan_layers=args.scan_layers, fused_attention=args.fused_attention)
  if args.patch:
    overrides["patches"] = dict(size=(args.patch, args.patch))
  return overrides


def time_steps(run, warmup, steps):
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
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


def benchmark(args):
  if args.batch < 0:
    raise UserError(f"--batch={args.batch} must be positive, or 0 for the largest batch that fits")
  if args.batch == 0 and args.peer_python:
    raise UserError("--batch=0 and --peer_python together: pass the batch the peer should run with")
  config = step_config(args)
  model = models.get_model(args.model_name, num_classes=args.num_classes, **model_overrides(args))
  cpu_devices.configure(args.cpu_devices, num_params=train.count_params(model, args.image_size),
                        batch_sizes=(args.batch,) if args.batch else (), mesh_sizes=list(config.mesh.values()))
  mesh = sharding.make_mesh(config.mesh)
  platform = mesh.devices.flat[0].platform
  dtype_name = compute_dtype.resolve(args.dtype, platform)
  peer = peer_command(args, dtype_name) if args.peer_python else None  # checked before the long part
  model = model.clone(dtype=compute_dtype.DTYPES[dtype_name])
  train.warn_if_remat_saves_nothing(args.remat, args.scan_layers, platform)
  limit = memory_limit_bytes(args.memory_limit_gib) if args.batch == 0 else None
  model_config = models.get_model_config(args.model_name)
  if args.patch:
    model_config.patches.size = (args.patch, args.patch)
  batch_sharding = sharding.batch_sharding(mesh)
  tx = optim.make_optimizer(config)
  init_fn = train.make_init_fn(model, tx, config)
  abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_shardings = sharding.tree_shardings(abstract_state, mesh)
  # Compiled from shapes alone: a deep model's compile time (and a batch search) without materialising anything.
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                                state_shardings)
  if args.mode == "train":
    step = train.make_train_step(model, tx, config, mesh, state_shardings)
  else:
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False),
                    in_shardings=(state_shardings.params, batch_sharding))

  compilations = {}  # batch -> (compiled, seconds)

  def compile_for(batch):
    if batch not in compilations:
      sharding.check_batch_size("batch", batch, mesh)
      images = jax.ShapeDtypeStruct((batch, args.image_size, args.image_size, 3), jnp.float32,
                                    sharding=batch_sharding)
      start = time.perf_counter()
      if args.mode == "train":
        labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding)
        compiled = step.lower(abstract_state, {"image": images, "label": labels}).compile()
      else:
        compiled = apply.lower(abstract_state.params, images).compile()
      compilations[batch] = compiled, time.perf_counter() - start
    return compilations[batch]

  search = None
  if args.batch:
    batch = args.batch
  else:
    def peak_bytes(batch):
      peak = compiled_stats(compile_for(batch)[0])[1]
      if peak is None:
        raise UserError(f"--batch=0 needs XLA's memory analysis, which {jax.devices()[0].platform} does not give")
      return peak
    batch, tried = largest_batch(peak_bytes, step=sharding.num_batch_shards(mesh), limit=limit)
    search = {"memory_limit_mib": round(limit / 2**20, 1),
              "tried": [{"batch": b, "peak_memory_mib": round(p / 2**20, 1), "fits": p <= limit}
                        for b, p in sorted(tried.items())]}
    compilations = {batch: compilations[batch]}  # free the other executables before running
  compiled, compile_s = compile_for(batch)
  flops_per_image = flops.train_flops_per_image(model_config, args.image_size, args.num_classes)
  if args.mode == "infer":
    flops_per_image /= 3  # forward only
  xla_flops, peak_bytes = compiled_stats(compiled)
  result = {
      "model": args.model_name, "mode": args.mode, "dtype": dtype_name, "image_size": args.image_size,
      "patch": args.patch or model_config.patches.size[0], "batch": batch, "remat": args.remat,
      "scan_layers": args.scan_layers, "fused_attention": args.fused_attention, "mesh": dict(mesh.shape),
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "allocator": allocator.describe(),  # what holds XLA:CPU's buffers (vit_jax.allocator)
      "compile_s": round(compile_s, 2), "model_gflops_per_step": round(flops_per_image * batch / 1e9, 2),
      # XLA costs one partition of the SPMD program: times the devices for the whole step. It counts a scanned
      # loop's body once, so with scan_layers its count is not the step's.
      "xla_gflops_per_step": (None if xla_flops is None or args.scan_layers
                              else round(xla_flops * mesh.size / 1e9, 2)),
      "peak_memory_mib": None if peak_bytes is None else round(peak_bytes / 2**20, 1),
  }
  if search:
    result["batch_search"] = search
  if args.compile_only:
    return result
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.uniform(-1, 1, (batch, args.image_size, args.image_size, 3)).astype(np.float32),
                          batch_sharding)
  labels = jax.device_put(rng.integers(0, args.num_classes, batch).astype(np.int32), batch_sharding)
  state = [jax.jit(init_fn, out_shardings=state_shardings)(jax.random.PRNGKey(0))]

  def run():
    if args.mode == "train":
      state[0], metrics = compiled(state[0], {"image": images, "label": labels})
      jax.block_until_ready(metrics)
    else:
      compiled(state[0].params, images).block_until_ready()

  step_s = time_steps(run, args.warmup, args.steps)
  peak = flops.peak_flops(compute_dtype.DTYPES[dtype_name], mesh.size)
  achieved = flops_per_image * batch / step_s
  result.update({
      "step_ms": round(step_s * 1e3, 2), "img_per_sec": round(batch / step_s, 1),
      "tflops_per_sec": _significant(achieved / 1e12), "peak_tflops_per_sec": _significant(peak / 1e12),
      "mfu": _significant(achieved / peak),
  })
  if peer:
    result["peer"] = run_peer(*peer)
    result["speedup_vs_peer"] = round(result["img_per_sec"] / result["peer"]["img_per_sec"], 2)
  return result


def peer_command(args, dtype_name):
  """The command that runs the timm peer on the benchmark's shape and dtype (`dtype_name`: float32 or bfloat16,
  bf16 autocast for timm), in its own venv: torch is never our dependency."""
  here = os.path.dirname(os.path.abspath(__file__))
  peer_dir = os.path.normpath(os.path.join(here, "..", "..", "shared", "peer"))
  if not os.path.exists(os.path.join(peer_dir, "timm_bench.py")):
    raise UserError(f"timm peer script not found in {peer_dir}; run from the project checkout beside shared/")
  timm_names = {"ViT-Ti_16": "vit_tiny_patch16_224", "ViT-S_16": "vit_small_patch16_224",
                "ViT-B_16": "vit_base_patch16_224", "ViT-L_16": "vit_large_patch16_224"}
  if args.num_classes != 10:  # timm_bench.py's head
    raise UserError(f"the timm peer script trains 10 classes; pass --num_classes=10 (not {args.num_classes})")
  if args.model_name not in timm_names:
    raise UserError(f"no timm twin for {args.model_name}; use one of {', '.join(timm_names)} with --peer_python")
  command = [args.peer_python, os.path.join(peer_dir, "timm_bench.py"), "--mode", args.mode, "--dtype",
             {"float32": "f32", "bfloat16": "bf16"}[dtype_name], "--batch", str(args.batch), "--image_size",
             str(args.image_size), "--patch", str(args.patch or 16), "--name", timm_names[args.model_name],
             "--steps", str(args.steps), "--warmup", str(args.warmup)]
  return command, dict(os.environ, PYTHONPATH=os.path.join(peer_dir, "tv_stub"))


def run_peer(command, env):
  """The timm peer's JSON line."""
  result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  if result.returncode:
    raise UserError(f"the timm peer failed ({' '.join(command)}): {result.stderr.strip().splitlines()[-1:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; see --help")
  logging.set_verbosity(logging.WARNING)
  print(json.dumps(benchmark(FLAGS)), flush=True)


if __name__ == "__main__":
  allocator.reexec_with_fast_allocator()  # first: the new process starts over
  app.run(lambda argv: run_cli(main, argv))
