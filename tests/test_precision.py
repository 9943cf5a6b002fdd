"""Float32-accumulating matmuls: the hand-written gradients equal JAX's autodiff, and bf16 stays close."""
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import precision

RNG = np.random.default_rng(0)


def normal(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def check_gradients(ours, reference, *args):
  loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
  want = jax.grad(loss(reference), argnums=tuple(range(len(args))))(*args)
  got = jax.grad(loss(ours), argnums=tuple(range(len(args))))(*args)
  np.testing.assert_allclose(ours(*args), reference(*args), rtol=1e-5, atol=1e-5)
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


# Both ways of computing the kernel gradient: the inputs transposed (features >= inputs per example) or the
# incoming gradient transposed (fewer features, e.g. the MLP's second layer), with one or two axes of each kind.
@pytest.mark.parametrize("inputs,kernel,contracted", [((4, 5, 6), (6, 7), 1), ((4, 5, 6), (6, 3, 2), 1),
                                                      ((4, 5, 3, 2), (3, 2, 6), 2), ((4, 5, 8), (8, 3), 1),
                                                      ((4, 5, 12), (12, 2, 3), 1), ((4, 5, 3, 4), (3, 4, 5), 2)])
def test_layer_matmul_gradient_equals_autodiff(inputs, kernel, contracted):
  contract = tuple(range(len(inputs) - contracted, len(inputs)))
  dimension_numbers = ((contract, tuple(range(contracted))), ((), ()))
  check_gradients(lambda x, w: precision.dot_general(x, w, dimension_numbers),
                  lambda x, w: lax.dot_general(x, w, dimension_numbers), normal(*inputs), normal(*kernel))


def test_attention_matmul_gradients_equal_autodiff():
  query, key = normal(2, 3, 5, 4), normal(2, 3, 6, 4)
  check_gradients(precision.attention_logits, lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k), query, key)
  weights, value = normal(2, 3, 5, 6), normal(2, 3, 6, 4)
  check_gradients(precision.attention_mix, lambda w, v: jnp.einsum("bhqk,bhkd->bhqd", w, v), weights, value)


@pytest.mark.slow
def test_bfloat16_attention_gradients_compile_and_stay_close():
  # A bf16 output, as in the model, and a loss of that output alone: the attention core in the zoo's (batch,
  # tokens, heads, d) layout once compiled to a bf16 matmul that XLA:CPU cannot run ("Unsupported element type for
  # DotThunk"); inside the model, fusions with the projections happened to avoid it.
  query, key, value = normal(2, 3, 17, 8), normal(2, 3, 17, 8), normal(2, 3, 17, 8)

  def loss(q, k, v):
    weights = jax.nn.softmax(precision.attention_logits(q, k), axis=-1)
    out = precision.attention_mix(weights.astype(v.dtype), v).astype(v.dtype)
    return 0.5 * jnp.sum(jnp.square(out.astype(jnp.float32)))

  g32 = jax.grad(loss, (0, 1, 2))(query, key, value)
  g16 = jax.jit(jax.grad(loss, (0, 1, 2)))(*(a.astype(jnp.bfloat16) for a in (query, key, value)))
  for a, b in zip(g16, g32):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.03 * np.abs(b).max())


@pytest.mark.parametrize("features", [16, 48])  # fewer and more features than inputs: both gradient layouts
def test_bfloat16_operands_give_float32_results_and_close_gradients(features):
  x, w = normal(64, 32), normal(32, features)
  dimension_numbers = (((1,), (0,)), ((), ()))
  f = lambda x, w: jnp.sum(jnp.tanh(precision.dot_general(x, w, dimension_numbers)))
  assert precision.dot_general(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dimension_numbers).dtype == \
      jnp.float32
  g32 = jax.grad(f, (0, 1))(x, w)
  g16 = jax.jit(jax.grad(f, (0, 1)))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))  # compiled, as in training
  for a, b in zip(g16, g32):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.03 * np.abs(b).max())


def _lowered_gradient(platform, dtype):
  """StableHLO text of a Dense layer's and attention's gradient, lowered for `platform` (no such device needed)."""
  def loss(kernel, x):
    y = precision.dot_general(x, kernel, (((2,), (0,)), ((), ())))
    q = y.reshape(2, 4, 4, 2).astype(dtype)  # (batch, heads, tokens, head_dim)
    weights = jax.nn.softmax(precision.attention_logits(q, q), axis=-1)
    return jnp.sum(precision.attention_mix(weights.astype(dtype), q))
  args = (jnp.ones((6, 8), dtype), jnp.ones((2, 4, 6), dtype))
  return jax.jit(jax.grad(loss)).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_tuned_gradients_lower_only_for_cpu(dtype):
  """The hand-written gradients (transposes behind optimization barriers) are XLA:CPU tuning: GPU and TPU lower
  JAX's own gradient of a plain float32-accumulating dot_general."""
  lowered = {platform: _lowered_gradient(platform, dtype) for platform in ("cpu", "cuda", "tpu")}
  assert "optimization_barrier" in lowered["cpu"]
  for platform in ("cuda", "tpu"):
    assert "optimization_barrier" not in lowered[platform], platform
    assert "dot_general" in lowered[platform] and "-> tensor<2x4x8xf32>" in lowered[platform], platform


def test_accelerator_gradients_equal_autodiff_of_the_plain_matmuls():
  """What GPU/TPU run (the `default` branch) is differentiated by JAX itself and equals the CPU branch's values."""
  x, kernel = normal(4, 5, 6), normal(6, 7)
  dimension_numbers = (((2,), (0,)), ((), ()))
  plain = lambda k: jnp.sum(jnp.sin(precision._matmul(x, k, 1)))  # pylint: disable=protected-access
  ours = lambda k: jnp.sum(jnp.sin(precision.dot_general(x, k, dimension_numbers)))
  np.testing.assert_allclose(jax.grad(ours)(kernel), jax.grad(plain)(kernel), rtol=1e-5, atol=1e-5)
