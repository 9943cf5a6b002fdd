"""Speed of the real train step (or inference) of a registry model, with model-FLOPs utilisation.

  python -m vit_jax.benchmark --model_name=ViT-B_16 --image_size=224 --batch=256 --mode=train --dtype=bfloat16

Prints one JSON line: compile time, median step time over `--steps` after `--warmup`, img/s, achieved FLOP/s,
MFU against a ceiling measured in the same run (`flops.peak_flops`: a large matmul in the same dtype with float32
accumulation, the way the model computes, times the devices), peak device memory from XLA's memory analysis, and
the analytic FLOP count next to XLA's own cost analysis. `--peer_python=.peer/bin/python` also runs the timm peer
(../shared/peer/timm_bench.py) on the same shape right after, for a side-by-side ratio.
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

from vit_jax import cpu_devices, flops, models, optim, sharding, train
from vit_jax.errors import UserError, run_cli

MODES = ("train", "infer")
FLAGS = flags.FLAGS
flags.DEFINE_string("model_name", "ViT-B_16", "Registry model name.")
flags.DEFINE_integer("image_size", 224, "Square input size in pixels.")
flags.DEFINE_integer("patch", 0, "Override the patch size (0 keeps the model's), e.g. 4 for a 32 px ViT-Ti.")
flags.DEFINE_integer("batch", 64, "Global batch size.")
flags.DEFINE_integer("num_classes", 1000, "Classes of the head.")
flags.DEFINE_enum("mode", "train", MODES, "Benchmark the train step or inference.")
flags.DEFINE_enum("dtype", "bfloat16", list(train.DTYPES), "Compute dtype (parameters stay float32).")
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
flags.DEFINE_bool("compile_only", False, "Only compile (compile time and memory of deep models); no steps.")
flags.DEFINE_string("peer_python", None, "Python of a torch+timm venv: also run the timm peer on this shape.")


def step_config(args):
  """The train-step keys of the config contract, with the benchmark's values."""
  return ml_collections.ConfigDict(dict(
      batch=args.batch, accum_steps=1, loss="softmax_xent", label_smoothing=0.0, optimizer=args.optimizer,
      momentum=0.9, beta2=0.999, momentum_dtype="float32", weight_decay=0.0 if args.optimizer == "sgd" else 0.1,
      grad_norm_clip=1.0, base_lr=1e-3, total_steps=1000, warmup_steps=10, decay_type="cosine",
      pp=dict(crop=args.image_size), dtype=args.dtype,
      mesh={axis: args[f"mesh.{axis}"].value for axis in sharding.MESH_AXES}))


def model_overrides(args):
  overrides = dict(dtype=train.DTYPES[args.dtype], remat=args.remat, scan_layers=args.scan_layers,
                   fused_attention=args.fused_attention)
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
  """(XLA's FLOP count, peak bytes per device) of a compiled executable; None where the backend does not say."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
  memory = compiled.memory_analysis()
  peak = None
  if memory is not None:
    peak = int(getattr(memory, "peak_memory_in_bytes", 0) or (
        memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        - memory.alias_size_in_bytes))
  return xla_flops, peak


def _significant(x, digits=4):
  return float(f"{x:.{digits}g}")


def benchmark(args):
  peer = peer_command(args) if args.peer_python else None  # checked before the long part
  config = step_config(args)
  model = models.get_model(args.model_name, num_classes=args.num_classes, **model_overrides(args))
  cpu_devices.configure(args.cpu_devices, num_params=train.count_params(model, args.image_size),
                        batch_sizes=(args.batch,), mesh_sizes=list(config.mesh.values()))
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size("batch", args.batch, mesh)
  model_config = models.get_model_config(args.model_name)
  if args.patch:
    model_config.patches.size = (args.patch, args.patch)
  batch_sharding = sharding.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.uniform(-1, 1, (args.batch, args.image_size, args.image_size, 3)).astype(np.float32),
                          batch_sharding)
  labels = jax.device_put(rng.integers(0, args.num_classes, args.batch).astype(np.int32), batch_sharding)
  tx = optim.make_optimizer(config)
  init_fn = train.make_init_fn(model, tx, config)
  abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  state_shardings = sharding.tree_shardings(abstract_state, mesh)
  # Compiled from shapes alone: a deep model's compile time is measured without materialising its state.
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                                state_shardings)
  flops_per_image = flops.train_flops_per_image(model_config, args.image_size, args.num_classes)

  start = time.perf_counter()
  if args.mode == "train":
    step = train.make_train_step(model, tx, config, mesh, state_shardings)
    compiled = step.lower(abstract_state, {"image": images, "label": labels}).compile()
    holder = []

    def run():
      holder[0], metrics = compiled(holder[0], {"image": images, "label": labels})
      jax.block_until_ready(metrics)
  else:
    flops_per_image /= 3  # forward only
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False),
                    in_shardings=(state_shardings.params, batch_sharding))
    compiled = apply.lower(abstract_state.params, images).compile()
    holder = []

    def run():
      compiled(holder[0].params, images).block_until_ready()
  compile_s = time.perf_counter() - start
  xla_flops, peak_bytes = compiled_stats(compiled)
  result = {
      "model": args.model_name, "mode": args.mode, "dtype": args.dtype, "image_size": args.image_size,
      "patch": args.patch or model_config.patches.size[0], "batch": args.batch, "remat": args.remat,
      "scan_layers": args.scan_layers, "fused_attention": args.fused_attention, "mesh": dict(mesh.shape),
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "compile_s": round(compile_s, 2), "model_gflops_per_step": round(flops_per_image * args.batch / 1e9, 2),
      # XLA costs one partition of the SPMD program: times the devices for the whole step.
      "xla_gflops_per_step": None if xla_flops is None else round(xla_flops * mesh.size / 1e9, 2),
      "peak_memory_mib": None if peak_bytes is None else round(peak_bytes / 2**20, 1),
  }
  if args.compile_only:
    return result
  holder.append(jax.jit(init_fn, out_shardings=state_shardings)(jax.random.PRNGKey(0)))
  step_s = time_steps(run, args.warmup, args.steps)
  peak = flops.peak_flops(train.DTYPES[args.dtype], mesh.size)
  achieved = flops_per_image * args.batch / step_s
  result.update({
      "step_ms": round(step_s * 1e3, 2), "img_per_sec": round(args.batch / step_s, 1),
      "tflops_per_sec": _significant(achieved / 1e12), "peak_tflops_per_sec": _significant(peak / 1e12),
      "mfu": _significant(achieved / peak),
  })
  if peer:
    result["peer"] = run_peer(*peer)
    result["speedup_vs_peer"] = round(result["img_per_sec"] / result["peer"]["img_per_sec"], 2)
  return result


def peer_command(args):
  """The command that runs the timm peer on the benchmark's shape (its own venv; torch is never our dependency)."""
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
             {"float32": "f32", "bfloat16": "bf16"}[args.dtype], "--batch", str(args.batch), "--image_size",
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
  app.run(lambda argv: run_cli(main, argv))
