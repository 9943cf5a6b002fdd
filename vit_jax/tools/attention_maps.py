"""Attention analysis of a ViT: the sown attention weights, attention rollout, mean attention distance; what the
pictures of `vit_jax.tools.visualize` show, kept apart from the plotting so that the numbers can be tested by hand.

- Rollout (Abnar & Zuidema 2020; ViT paper Fig. 6 and App. D.8): average the heads of each layer, add the identity
  for the residual connection, renormalise rows, and multiply the layers' matrices from the first to the last.
  Row `q` of the product is how much each input token flows into output token `q`.
- Mean attention distance (ViT paper Fig. 7 right, App. D.7): for each head, the distance in pixels between a
  query patch and every key patch, weighted by the attention weight, averaged over queries and images. The
  class token has no position: it is left out as a query, and patch keys' weights are renormalised without it.
"""
import jax
import numpy as np

from vit_jax.errors import UserError
from vit_jax.models import geometry


def _require_transformer(transformer, what):
  if not transformer:
    raise UserError(f"{what} needs a transformer, and this model has none (transformer=None): it has no attention")


def require_attention(model_config, what):
  """UserError unless the model of `model_config` has attention layers to picture."""
  _require_transformer(model_config.get("transformer"), what)


def attention_weights(model, params, images):
  """[layers] of numpy (batch, heads, tokens, tokens): every encoder block's attention weights on `images`."""
  _require_transformer(model.transformer, "attention weights")

  @jax.jit
  def run(params, images):
    _, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
    return state["intermediates"]["Transformer"]

  blocks = jax.device_get(run(params, images))
  if "encoderblock" in blocks:  # scan_layers=True: one entry stacked over a leading layer axis
    return list(np.asarray(blocks["encoderblock"]["MultiHeadDotProductAttention_1"]["attention_weights"][0]))
  return [np.asarray(blocks[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["attention_weights"][0])
          for i in range(len(blocks))]


def rollout(weights):
  """(batch, tokens, tokens) joint attention of [layers] of (batch, heads, tokens, tokens) weights."""
  joint = None
  for layer in weights:
    attention = np.asarray(layer, np.float64).mean(axis=1)
    attention = attention + np.eye(attention.shape[-1])
    attention = attention / attention.sum(axis=-1, keepdims=True)
    joint = attention if joint is None else attention @ joint
  return joint


def rollout_map(joint, model_config, image_size):
  """(batch, grid_h, grid_w) attention of the pooled output to each patch, scaled to a maximum of 1.

  `token` models: the class token's row; `gap` models: the mean of the patch tokens' rows (what gap pools).
  """
  classifier = model_config.get("classifier", "token")
  if classifier in ("unpooled", "map"):
    raise UserError(f"attention rollout shows what the pooled output attends to through the encoder; a "
                    f"`{classifier}` model pools elsewhere or not at all (use a token or gap model)")
  prefix = geometry.num_prefix_tokens(model_config)  # class token and registers: no place in the grid
  if geometry.has_class_token(model_config):
    flow = joint[:, 0, prefix:]
  else:
    flow = joint[:, prefix:, prefix:].mean(axis=1)
  flow = flow / flow.max(axis=-1, keepdims=True)
  return flow.reshape(len(flow), *geometry.grid_shape(model_config, image_size))


def patch_distances(grid, patch_size):
  """(patches, patches) Euclidean distances in pixels between the centres of the patches of a grid."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  centres = np.stack([rows.ravel() * patch_size[0], cols.ravel() * patch_size[1]], axis=-1).astype(np.float64)
  return np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))


def mean_attention_distance(weights, grid, patch_size, num_prefix_tokens):
  """(heads,) mean attention distance in pixels of one layer's (batch, heads, tokens, tokens) weights."""
  w = np.asarray(weights, np.float64)[:, :, num_prefix_tokens:, num_prefix_tokens:]
  w = w / w.sum(axis=-1, keepdims=True)
  per_query = (w * patch_distances(grid, patch_size)).sum(axis=-1)  # (batch, heads, queries)
  return per_query.mean(axis=(0, 2))
