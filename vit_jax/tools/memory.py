"""Memory per chip of training a registry model: parameters, gradients, optimizer state and activations.

  python -m vit_jax.tools.memory --model_name=ViT-H_14 --batch=4096 --image_size=224 --devices=256 \
      --mesh.data=-1 --mesh.fsdp=16 --optimizer=adamw --remat=full --dtype=bfloat16
  python -m vit_jax.tools.memory --table   # the table of docs/scaling.md
  python -m vit_jax.tools.memory --model_name=BiT-R50x1 --batch=256 --image_size=224 --devices=8 --mesh.data=-1

Parameters and optimizer state are counted exactly: `jax.eval_shape` of the model's init and of the optax
optimizer of `vit_jax.optim`, sharded by the parameter rules of `vit_jax.sharding` (a dimension is split only when
its mesh axis divides it, as in training). Activations are analytic: what the backward pass keeps per encoder
block (formulas in `block_activation_bytes` and docs/scaling.md). XLA's temporary buffers, the data pipeline and
the runtime's reserve are not counted: plan for ~10-20% headroom.

The convolutional families (BiT ResNets, the course CNN) have no such formula: their activations are measured,
XLA's temporary bytes of the compiled loss gradient at the per-device batch on this process's backend, less the
part that does not grow with the batch (`measured_activation_bytes`; compiled from shapes alone, nothing
allocated: seconds to a minute). On a CPU host that is XLA:CPU's plan, which fuses and lays out differently from a
GPU's or TPU's: a guide, not a bound. BatchNorm's running statistics (a few KiB) are not counted.
"""
import dataclasses
import functools
import math
from typing import Dict

from absl import flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import models, optim, sharding
from vit_jax.errors import UserError
from vit_jax.models import geometry, precision
from vit_jax.models import state as model_state_lib
from vit_jax.tools import cli

FLAGS = flags.FLAGS
GIB = 2 ** 30
# `dtype=auto` plans for an accelerator, where training's auto is bfloat16.
PLANNED_PLATFORM = "tpu"


@dataclasses.dataclass
class Estimate:
  """Bytes per device; `params` etc. are exact, `activations` analytic (ViTs) or measured (`activations_from`)."""
  num_params: int
  params: int
  gradients: int
  optimizer: int
  activations: int
  per_device_batch: float
  activations_from: str = "analytic"  # or "measured on XLA:<platform>" (the convolutional families)

  @property
  def total(self) -> int:
    return self.params + self.gradients + self.optimizer + self.activations


def bytes_per_element(dtype) -> int:
  """Bytes per element of a compute dtype name (`precision.DTYPES`; auto: what an accelerator computes in)."""
  return np.dtype(precision.DTYPES[precision.resolve_dtype(dtype, PLANNED_PLATFORM)]).itemsize


def _check_remat(remat):
  if remat not in models.REMAT_POLICIES:
    raise UserError(f"unknown remat policy {remat!r}; use one of {', '.join(models.REMAT_POLICIES)}")


@functools.lru_cache(maxsize=None)  # the table asks for each model several times
def abstract_state(model_name, *, image_size, num_classes=1000, optimizer="adamw", momentum_dtype="float32"):
  """(params, opt_state) as `jax.ShapeDtypeStruct` trees: nothing is allocated."""
  model = models.get_model(model_name, num_classes=num_classes)
  images = jax.ShapeDtypeStruct((1, *geometry.image_hw(image_size), 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False)["params"], images)
  # The schedule, weight decay and clipping do not change the state's size.
  tx, _ = optim.make_optimizer(optimizer=optimizer, base_lr=1e-3, total_steps=100, warmup_steps=10,
                               decay_type="cosine", momentum_dtype=momentum_dtype, weight_decay=1e-4,
                               grad_norm_clip=1.0)
  opt_state = jax.eval_shape(tx.init, params)
  return params, opt_state


def sharded_bytes(tree, mesh_sizes) -> int:
  """Bytes of `tree` held by one device under the parameter sharding rules (the largest shard of each leaf)."""
  mesh = jax.sharding.AbstractMesh(tuple(mesh_sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES)
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = sharding.partition_spec(sharding.path_str(path), leaf.shape, mesh)
    shard = list(leaf.shape)
    for dim, axis in enumerate(spec):
      if axis is not None:
        shard[dim] //= mesh_sizes[axis]
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def block_activation_bytes(tokens, hidden, mlp_dim, heads, dtype_bytes, remat="none", tensor=1) -> Dict[str, float]:
  """Activation bytes of one encoder block per example: {'saved': kept for the backward pass, 'working': ...}.

  'saved' is what JAX's autodiff keeps of this model's block (the residuals `jax.ad_checkpoint` reports; the test
  checks the formula against them). N tokens, D hidden, M mlp, H heads, b bytes of the compute dtype; layer
  norms, softmax, GELU and matmul accumulation are float32 (see vit_jax/models):
    none:      N*D*(6*4 + 6*b)   per layer norm x^2, x - mean and the normalised x (f32), its output (b);
                                 q (scaled), k, v and the attention output (b)
             + N*M*(5*4 + b)     the Dense_0 output and the 4 intermediates of the tanh GELU (f32), its output (b)
             + H*N^2*(4 + b)     exp of the attention logits (f32) and the attention weights (b)
             + (8*N + 2*H*N)*4   layer-norm and softmax statistics
    save_dots: 5*N*D*4 + N*M*4   the block input and the f32 outputs of the matmuls without batch dimensions
                                 (q, k, v, out, Dense_1; Dense_0)
    full:      N*D*4             the block input only
  'working' is the transient of the one block being differentiated (its cotangents, or with remat its recomputed
  activations), counted as one block's full `none` set. Terms over heads or MLP units divide by the
  tensor-parallel degree; the residual stream and layer norms are replicated across it.
  """
  _check_remat(remat)
  n, d, m, h, b, t = tokens, hidden, mlp_dim, heads, dtype_bytes, tensor
  everything = (n * d * (6 * 4 + 2 * b) + 8 * n * 4  # the two layer norms
                + (n * d * 4 * b + n * m * (5 * 4 + b) + h * n * n * (4 + b) + 2 * h * n * 4) / t)
  if remat == "none":
    return {"saved": everything, "working": everything}
  if remat == "save_dots":
    return {"saved": 2 * n * d * 4 + (3 * n * d * 4 + n * m * 4) / t, "working": everything}
  if remat == "full":
    return {"saved": n * d * 4, "working": everything}
  raise NotImplementedError(f"no activation formula for remat={remat!r} yet; add it here and to the docstring")


def residual_bytes_per_example(model_config, *, image_size, dtype="float32", remat="none", tensor=1) -> float:
  """What autodiff keeps per example: every block's 'saved', the image (b), the final layer norm and the head input."""
  b = bytes_per_element(dtype)
  tokens, hidden = geometry.num_tokens(model_config, image_size), model_config.hidden_size
  height, width = geometry.image_hw(image_size)
  io = height * width * 3 * b + 3 * tokens * hidden * 4 + 4 * tokens * 4 + hidden * 4
  transformer = model_config.get("transformer")
  if transformer is None:
    return float(io)
  block = block_activation_bytes(tokens, model_config.hidden_size, transformer.mlp_dim, transformer.num_heads, b,
                                 remat, tensor)
  return io + transformer.num_layers * block["saved"]


def activation_bytes_per_example(model_config, *, image_size, dtype="float32", remat="none", tensor=1) -> float:
  """Activation memory per example of a ViT's training step: the residuals plus one block's working set."""
  if models.family(model_config) != "vit":
    raise UserError(f"no activation formula for {models.family_description(model_config)}; "
                    "measured_activation_bytes compiles its gradient instead")
  saved = residual_bytes_per_example(model_config, image_size=image_size, dtype=dtype, remat=remat, tensor=tensor)
  transformer = model_config.get("transformer")
  if transformer is None:
    return saved
  block = block_activation_bytes(geometry.num_tokens(model_config, image_size), model_config.hidden_size,
                                 transformer.mlp_dim, transformer.num_heads, bytes_per_element(dtype), remat, tensor)
  return saved + block["working"]


@functools.lru_cache(maxsize=None)
def gradient_temp_bytes(model_name, *, batch, image_size, dtype="float32", num_classes=1000) -> int:
  """XLA's temporary bytes of the compiled loss gradient of `batch` examples (softmax cross-entropy, training mode:
  BatchNorm on the batch's statistics) on this process's default backend, compiled from shapes alone."""
  compute_dtype = precision.DTYPES[precision.resolve_dtype(dtype, PLANNED_PLATFORM)]
  model = models.get_model(model_name, num_classes=num_classes, dtype=compute_dtype)
  height, width = geometry.image_hw(image_size)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3)),
                                                train=False))
  params, model_state = model_state_lib.from_init(variables)

  def loss(params_, model_state_, images, labels):
    logits, _ = model_state_lib.train_apply(model, model_state_lib.variables(params_, model_state_), images,
                                            jax.random.PRNGKey(0))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  compiled = jax.jit(jax.grad(loss)).lower(
      params, model_state, jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32),
      jax.ShapeDtypeStruct((batch,), jnp.int32)).compile()
  memory = compiled.memory_analysis()
  if memory is None:
    raise UserError(f"{model_name}'s activations are measured from XLA's memory analysis, which "
                    f"{jax.default_backend()} does not give; run the tool on a CPU, GPU or TPU host")
  return memory.temp_size_in_bytes


def measured_activation_bytes(model_name, *, batch, image_size, dtype="float32", num_classes=1000) -> float:
  """Activation bytes of a training step of `batch` examples on one device, for a model without an analytic
  formula (the convolutional families): XLA's temporaries of the compiled gradient at that batch, less what does
  not grow with the batch (BiT's standardised kernels, gradient buffers), extrapolated to batch 0 from batches 1
  and 2. Three compilations (seconds to a minute each). Not the slope of two small batches times the batch: on
  XLA:CPU the bytes per example grow with the batch (the course CNN at 32 px: 2.3 MiB per example between batches
  2 and 8, 3.4 between 64 and 128). Where the extrapolation is not positive (the course CNN in bfloat16 at 8
  images: XLA:CPU lays the larger batch out more tightly), the slope of batches 1 and 2 times the batch, at least 0."""
  temp = functools.partial(gradient_temp_bytes, model_name, image_size=image_size, dtype=dtype,
                           num_classes=num_classes)
  one, two = temp(batch=1), temp(batch=2)
  measured = temp(batch=batch) - (2 * one - two)
  if measured <= 0:  # XLA:CPU can lay out a larger batch's buffers more tightly (bf16): the slope, not nonsense
    measured = batch * max(two - one, 0)
  return measured


def estimate(model_name, *, batch, image_size, mesh=None, num_devices=None, optimizer="adamw", remat="none",
             dtype="float32", momentum_dtype="float32", num_classes=1000, accum_steps=1) -> Estimate:
  """Memory per device of one training step of `model_name` (see the module docstring); `mesh` sizes as in
  training (missing axes 1, one may be -1: the devices of `num_devices` the others leave)."""
  bytes_per_element(dtype)  # an unknown dtype fails here, before anything slow
  _check_remat(remat)
  sizes = sharding.resolve_mesh_sizes(mesh or {}, num_devices)
  batch_shards = sizes["data"] * sizes["fsdp"]
  sharding.check_divisible("batch", batch, shards=batch_shards, processes=1, accum_steps=accum_steps)
  model_config = models.get_model_config(model_name)
  convolutional = models.family(model_config) != "vit"
  if convolutional and remat != "none":
    raise UserError(f"--remat={remat} is for Vision Transformers, not for {models.family_description(model_config)}; "
                    "drop it")
  params, opt_state = abstract_state(model_name, image_size=image_size, num_classes=num_classes,
                                     optimizer=optimizer, momentum_dtype=momentum_dtype)
  param_bytes = sharded_bytes(params, sizes)
  per_device_batch = batch / batch_shards / accum_steps
  if convolutional:
    activations = measured_activation_bytes(model_name, batch=int(per_device_batch), image_size=image_size,
                                            dtype=dtype, num_classes=num_classes)
    activations_from = f"measured on XLA:{jax.default_backend()}"
  else:
    activations = per_device_batch * activation_bytes_per_example(
        model_config, image_size=image_size, dtype=dtype, remat=remat, tensor=sizes["tensor"])
    activations_from = "analytic"
  return Estimate(num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)), params=param_bytes,
                  gradients=param_bytes, optimizer=sharded_bytes(opt_state, sizes), activations=int(activations),
                  per_device_batch=per_device_batch, activations_from=activations_from)


# --- the guide's table ------------------------------------------------------------------------------------------

# (model, mesh) rows of docs/scaling.md: 224 px, bfloat16 compute, AdamW with float32 state, 32 images per chip.
TABLE_MODELS = ("ViT-Ti_16", "ViT-S_16", "ViT-B_32", "ViT-B_16", "ViT-L_16", "ViT-B_8", "ViT-H_14")
TABLE_SETUP = dict(image_size=224, dtype="bfloat16", optimizer="adamw", per_device_batch=32, num_devices=8)


def table() -> str:
  """A markdown table: GiB per chip of each model for data-parallel vs FSDP over 8 chips and each remat policy
  (columns from the policy that keeps the most activations to the one that keeps the fewest)."""
  setup = TABLE_SETUP
  batch = setup["per_device_batch"] * setup["num_devices"]
  common = dict(batch=batch, image_size=setup["image_size"], num_devices=setup["num_devices"],
                optimizer=setup["optimizer"], dtype=setup["dtype"])
  rows, remats = [], None
  for name in TABLE_MODELS:
    dp = estimate(name, mesh={"data": -1}, **common)
    fsdp = {remat: estimate(name, mesh={"data": 1, "fsdp": -1}, remat=remat, **common)
            for remat in models.REMAT_POLICIES}
    remats = remats or sorted(fsdp, key=lambda r: -fsdp[r].activations)
    state = lambda e: (e.params + e.gradients + e.optimizer) / GIB
    cells = [name, f"{dp.num_params / 1e6:.1f} M", f"{state(dp):.2f}", f"{state(fsdp['none']):.2f}"]
    cells += [f"{fsdp[r].activations / GIB:.2f}" for r in remats]
    cells += [f"{fsdp[remats[0]].total / GIB:.2f}", f"{fsdp[remats[-1]].total / GIB:.2f}"]
    rows.append("| " + " | ".join(cells) + " |")
  activations = [f"activations remat={remats[0]}"] + remats[1:]
  return "\n".join([
      f"Per chip, {setup['image_size']} px, {setup['dtype']} compute, {setup['optimizer']} (float32 state), "
      f"{setup['per_device_batch']} images per chip, {setup['num_devices']} chips; GiB.",
      "",
      "| model | params | state, data-parallel | state, fsdp=8 | " + " | ".join(activations) +
      f" | total fsdp=8, {remats[0]} | total fsdp=8, {remats[-1]} |",
      "|---|---:|---:|---:|" + "---:|" * len(remats) + "---:|---:|",
      *rows,
  ])


# --- CLI --------------------------------------------------------------------------------------------------------


def define_flags():
  """Flags of this tool, defined only when it runs."""
  cli.define_flags("model_name", "batch", "image_size", "num_classes", "optimizer", "remat", "dtype", "mesh",
                   model_name="ViT-B_16", batch=512, image_size=224, optimizer="adamw", dtype="bfloat16",
                   mesh={"data": 1})
  flags.DEFINE_integer("devices", None, "Total number of chips; needed when a mesh size is -1.")
  flags.DEFINE_enum("momentum_dtype", "float32", list(precision.DTYPES), "Dtype of the optimizer's momentum.")
  flags.DEFINE_integer("accum_steps", 1, "Gradient-accumulation micro-batches per step.")
  flags.DEFINE_bool("table", False, "Print the table of docs/scaling.md instead.")


def report(e: Estimate, *, model_name, optimizer, remat, dtype, mesh_sizes, batch, image_size) -> str:
  how = f"remat={remat}" if e.activations_from == "analytic" else e.activations_from  # a CNN has no remat
  rows = [("parameters (float32)", e.params), ("gradients (float32)", e.gradients),
          (f"optimizer state ({optimizer})", e.optimizer),
          (f"activations ({how}, {dtype}, {e.per_device_batch:g} images)", e.activations),
          ("total", e.total)]
  width = max(len(r[0]) for r in rows)
  head = (f"{model_name}: {e.num_params:,} parameters; per device of mesh {mesh_sizes}, "
          f"batch {batch} at {image_size} px")
  return "\n".join([head] + [f"  {label:<{width}}  {value / GIB:9.3f} GiB" for label, value in rows])


def main():
  logging.set_verbosity(logging.WARNING)  # a convolutional model compiles: no backend-probing INFO lines
  if FLAGS.table:
    print(table())
    return
  mesh = cli.mesh_config()
  e = estimate(FLAGS.model_name, batch=FLAGS.batch, image_size=FLAGS.image_size, mesh=mesh, num_devices=FLAGS.devices,
               optimizer=FLAGS.optimizer, remat=FLAGS.remat, dtype=FLAGS.dtype, momentum_dtype=FLAGS.momentum_dtype,
               num_classes=FLAGS.num_classes, accum_steps=FLAGS.accum_steps)
  print(report(e, model_name=FLAGS.model_name, optimizer=FLAGS.optimizer, remat=FLAGS.remat, dtype=FLAGS.dtype,
               mesh_sizes=sharding.resolve_mesh_sizes(mesh, FLAGS.devices), batch=FLAGS.batch,
               image_size=FLAGS.image_size))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
