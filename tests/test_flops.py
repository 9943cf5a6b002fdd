"""Analytic FLOPs (the MFU numerator) against XLA's own count of the compiled forward pass."""
import jax
import jax.numpy as jnp
import pytest

from vit_jax import flops, models


def xla_forward_flops(model, size):
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]
  compiled = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


@pytest.mark.parametrize("name,size,overrides", [
    ("ViT-Ti_16", 64, {}),
    ("testing", 32, {"patches": {"size": (4, 4)}, "hidden_size": 64, "transformer": {"num_heads": 4, "mlp_dim": 128}}),
])
def test_plain_vit_matmul_flops_are_most_of_what_xla_counts(name, size, overrides):
  model = models.get_model(name, num_classes=10, **overrides)
  config = models.get_model_config(name)
  config.update(overrides)
  ours = flops.train_flops_per_image(config, size, 10) / 3
  xla = xla_forward_flops(model, size)
  # XLA also counts the softmax, GELU and layer norms, which the analytic count leaves out.
  assert 0.85 * xla <= ours <= xla


def test_a_hybrid_counts_the_tokens_of_its_resnet_grid():
  config = models.get_model_config("R50+ViT-B_16")  # stride 16: 14 x 14 tokens at 224 px, not 224 x 224
  per_layer = 8 * 197 * 768**2 + 4 * 197 * 768 * 3072 + 4 * 197**2 * 768
  embedding = 2 * 196 * 1024 * 768  # 1x1 patches of the 1024-channel ResNet features
  expected = 3 * (12 * per_layer + embedding + 2 * 768 * 1000)
  assert flops.train_flops_per_image(config, 224, 1000) == expected
