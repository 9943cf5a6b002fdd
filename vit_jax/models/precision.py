"""Compute precision: the compute dtype (`dtype=auto|float32|bfloat16`), and matmuls and convolutions that
accumulate in float32 whatever the operand dtype, forward and backward.

`auto` is bfloat16 on GPU and TPU, and on CPUs whose instruction set multiplies bfloat16 natively (AVX512-BF16,
AMX-BF16); other CPUs emulate bfloat16 and run it slower, so `auto` is float32 there (docs/benchmarks.md).
Parameters and optimizer state are float32 either way.

With bfloat16 operands, JAX's own gradient of a float32-accumulating matmul multiplies the float32 cotangent with
a bf16 operand, which XLA computes as a float32 matmul. On CPU the layers' matmuls (inputs' trailing axes
contracted with the kernel's leading axes) and attention's two batched matmuls therefore have their own gradients,
shaped for XLA:CPU: the cotangent is rounded to the operands' dtype and the gradient matmuls accumulate in float32,
as the forward does. GPU and TPU get plain `dot_general` with float32 accumulation and JAX's own gradients
(`lax.platform_dependent` picks per lowering platform). With float32 operands both are the plain float32
computation.
"""
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

from vit_jax.errors import UserError

AUTO = "auto"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_CHOICES = (AUTO, *DTYPES)
# /proc/cpuinfo flags of x86 CPUs with bf16 dot-product instructions (AMX CPUs have both).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"


def cpu_flags(cpuinfo_text: str) -> set:
  """The feature flags of the first CPU listed in /proc/cpuinfo text (empty if it lists none)."""
  for line in cpuinfo_text.splitlines():
    name, _, value = line.partition(":")
    if name.strip() == "flags":
      return set(value.split())
  return set()


def cpu_has_bf16_matmul(cpuinfo_path: str = CPUINFO) -> bool:
  try:
    with open(cpuinfo_path) as f:
      flags = cpu_flags(f.read())
  except OSError:  # not Linux: unknown, so the safe float32
    return False
  return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_dtype(name: str, platform: str, cpuinfo_path: str = CPUINFO) -> str:
  """`float32` or `bfloat16`: `name` itself, or what `auto` means on `platform` ('cpu', 'gpu', 'tpu')."""
  if name == AUTO:
    if platform != "cpu" or cpu_has_bf16_matmul(cpuinfo_path):
      return "bfloat16"
    return "float32"
  if name not in DTYPES:
    raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)}")
  return name


def _backward(cpu_backward, primal_fn, residuals, grad):
  """`cpu_backward(*residuals, grad)` where the computation is lowered for CPU; JAX's own gradient of `primal_fn`
  elsewhere (GPU, TPU). Only the backward pass branches, so both platforms save the same residuals."""
  def autodiff(*args):
    _, vjp = jax.vjp(primal_fn, *args[:-1])
    return vjp(args[-1])
  return lax.platform_dependent(*residuals, grad, cpu=cpu_backward, default=autodiff)


conv_general_dilated = functools.partial(lax.conv_general_dilated, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _layer_matmul(inputs, kernel, num_contracted):
  return _matmul(inputs, kernel, num_contracted)


def _matmul(inputs, kernel, num_contracted):
  contract_inputs = tuple(range(inputs.ndim - num_contracted, inputs.ndim))
  dimension_numbers = ((contract_inputs, tuple(range(num_contracted))), ((), ()))
  return lax.dot_general(inputs, kernel, dimension_numbers, preferred_element_type=jnp.float32)


def _layer_matmul_fwd(inputs, kernel, num_contracted):
  return _matmul(inputs, kernel, num_contracted), (inputs, kernel)


def _layer_matmul_bwd(num_contracted, residuals, grad):
  return _backward(functools.partial(_cpu_layer_matmul_bwd, num_contracted),
                   functools.partial(_matmul, num_contracted=num_contracted), residuals, grad)


def _cpu_layer_matmul_bwd(num_contracted, inputs, kernel, grad):
  grad = grad.astype(inputs.dtype)
  num_batch = inputs.ndim - num_contracted  # the inputs' free (leading) axes
  # d inputs[b..., c...] = sum_f grad[b..., f...] kernel[c..., f...]
  grad_inputs = lax.dot_general(
      grad, kernel, ((tuple(range(num_batch, grad.ndim)), tuple(range(num_contracted, kernel.ndim))), ((), ())),
      preferred_element_type=jnp.float32)
  # d kernel[c..., f...] = sum_b inputs[b..., c...] grad[b..., f...]. XLA:CPU runs this at full bf16 rate only
  # once one operand is transposed to put the long batch axes last, so transpose the smaller of the two (the
  # copy is memory-bound), and transpose the small result back when it was the gradient. The barriers keep XLA
  # from folding either transpose back into the matmul (which would then run in float32, or not at all).
  batch_axes, to_end = tuple(range(num_batch)), tuple(range(-num_batch, 0))
  num_features = grad.ndim - num_batch
  if math.prod(inputs.shape[num_batch:]) <= math.prod(grad.shape[num_batch:]):
    inputs_t = lax.optimization_barrier(jnp.moveaxis(inputs, batch_axes, to_end))
    grad_kernel = lax.dot_general(inputs_t, grad, ((tuple(range(num_contracted, inputs.ndim)), batch_axes), ((), ())),
                                  preferred_element_type=jnp.float32)
  else:
    grad_t = lax.optimization_barrier(jnp.moveaxis(grad, batch_axes, to_end))
    grad_kernel_t = lax.dot_general(grad_t, inputs, ((tuple(range(num_features, grad.ndim)), batch_axes), ((), ())),
                                    preferred_element_type=jnp.float32)
    grad_kernel = jnp.moveaxis(lax.optimization_barrier(grad_kernel_t), tuple(range(num_features)),
                               tuple(range(-num_features, 0)))
  return grad_inputs.astype(inputs.dtype), grad_kernel.astype(kernel.dtype)


_layer_matmul.defvjp(_layer_matmul_fwd, _layer_matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`lax.dot_general` for flax's Dense/DenseGeneral (`dot_general=` argument), float32-accumulating."""
  del preferred_element_type  # always float32
  (contract_lhs, contract_rhs), (batch_lhs, batch_rhs) = dimension_numbers
  n = len(contract_lhs)
  is_layer_matmul = (not batch_lhs and not batch_rhs and precision is None and not kwargs
                     and tuple(contract_lhs) == tuple(range(lhs.ndim - n, lhs.ndim))
                     and tuple(contract_rhs) == tuple(range(n)))
  if is_layer_matmul:
    return _layer_matmul(lhs, rhs, n)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=jnp.float32,
                         **kwargs)


def _einsum(spec, a, b):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


# Attention's two batched matmuls, over (batch, heads, tokens, head_dim) arrays, with the same gradient rule.
# XLA:CPU runs a batched bf16 matmul with float32 results only when the contracted axis is the first operand's last
# (otherwise it fails: "Unsupported element type for DotThunk"), and runs these small matmuls faster in this
# heads-major layout than with the heads axis between tokens and head_dim (the zoo's projection layout). The
# gradients that contract the query axis read a transposed copy of their first operand (a barrier keeps XLA from
# folding the transpose back into the matmul).


def _swap_last_axes(x):
  return lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


def _plain_attention_logits(query, key):
  return _einsum("bhqd,bhkd->bhqk", query, key)


def _plain_attention_mix(weights, value):
  return _einsum("bhqk,bhkd->bhqd", weights, value)


@jax.custom_vjp
def attention_logits(query, key):
  """logits[b, h, q, k] = sum_d query[b, h, q, d] key[b, h, k, d], float32."""
  return _plain_attention_logits(query, key)


@jax.custom_vjp
def attention_mix(weights, value):
  """out[b, h, q, d] = sum_k weights[b, h, q, k] value[b, h, k, d], float32."""
  return _plain_attention_mix(weights, value)


def _attention_logits_fwd(query, key):
  return _plain_attention_logits(query, key), (query, key)


def _attention_logits_bwd(residuals, grad):
  return _backward(_cpu_attention_logits_bwd, _plain_attention_logits, residuals, grad)


def _cpu_attention_logits_bwd(query, key, grad):
  grad = grad.astype(query.dtype)
  return (_einsum("bhqk,bhkd->bhqd", grad, key).astype(query.dtype),
          _einsum("bhkq,bhqd->bhkd", _swap_last_axes(grad), query).astype(key.dtype))


attention_logits.defvjp(_attention_logits_fwd, _attention_logits_bwd)


def _attention_mix_fwd(weights, value):
  return _plain_attention_mix(weights, value), (weights, value)


def _attention_mix_bwd(residuals, grad):
  return _backward(_cpu_attention_mix_bwd, _plain_attention_mix, residuals, grad)


def _cpu_attention_mix_bwd(weights, value, grad):
  grad = grad.astype(value.dtype)
  return (_einsum("bhqd,bhkd->bhqk", grad, value).astype(weights.dtype),
          _einsum("bhkq,bhqd->bhkd", _swap_last_axes(weights), grad).astype(value.dtype))


attention_mix.defvjp(_attention_mix_fwd, _attention_mix_bwd)
