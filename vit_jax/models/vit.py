"""Vision Transformer (Dosovitskiy et al. 2020) and its ResNet hybrids, with the model zoo's parameter paths.

Submodules are named explicitly so that every parameter path equals its key in the zoo's `.npz` files, e.g.
`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel` of shape (hidden, heads, head_dim).
Parameters are float32; `dtype` is the compute dtype of matmuls and convolutions (bfloat16 for mixed precision),
while layer norms, the softmax and the returned logits stay float32.
"""
import re
from typing import Any, Mapping, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vit_jax.errors import UserError
from vit_jax.models import geometry, precision, resnet

CLASSIFIERS = ("token", "gap", "map", "unpooled", "token_unpooled")
# Rematerialisation of each encoder block in the backward pass: trade compute for activation memory.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, redo the rest
}

# Parameter shardings over the (data, fsdp, tensor) mesh of `vit_jax.sharding`: (regex over the path, spec).
SHARDING_RULES = (
    (r".*/(query|key|value)/kernel$", P("fsdp", "tensor", None)),  # (hidden, heads, head_dim)
    (r".*/(query|key|value)/bias$", P("tensor", None)),  # (heads, head_dim)
    (r".*/out/kernel$", P("tensor", None, "fsdp")),  # (heads, head_dim, hidden)
    (r".*/MlpBlock_3/Dense_0/kernel$", P("fsdp", "tensor")),  # (hidden, mlp)
    (r".*/MlpBlock_3/Dense_0/bias$", P("tensor")),
    (r".*/MlpBlock_3/Dense_1/kernel$", P("tensor", "fsdp")),  # (mlp, hidden)
    (r"(.*/)?embedding/kernel$", P(None, None, None, "fsdp")),  # (patch, patch, 3, hidden)
    (r"(.*/)?head/kernel$", P("fsdp", None)),  # (hidden, classes)
)


def warn_if_remat_saves_nothing(remat, scan_layers, platform):
  """XLA:CPU's scheduler runs an unrolled model's recomputation early, so remat without scan keeps every
  activation there (docs/scaling.md); GPU and TPU compilers schedule for memory."""
  if remat != "none" and not scan_layers and platform == "cpu":
    logging.warning("remat=%s without scan_layers saves no memory on CPU (XLA:CPU recomputes early); add "
                    "scan_layers=True for the saving", remat)


def _layer_norm(name, eps=1e-6):
  # float32 whatever the compute dtype: bf16 statistics lose too much precision.
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, name=name)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding of shape (1, tokens, hidden)."""

  @nn.compact
  def __call__(self, x):
    posemb = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + posemb.astype(x.dtype)


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  gelu_approximate: bool = True  # the zoo's tanh GELU; False: exact erf GELU (Hugging Face transformers' ViT)

  @nn.compact
  def __call__(self, x, *, deterministic):
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, dot_general=precision.dot_general,
        kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    out_dim = x.shape[-1]
    x = nn.gelu(dense(self.mlp_dim, "Dense_0")(x), approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim, "Dense_1")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with `query|key|value` kernels (hidden, heads, head_dim) and `out` (heads, head_dim, hidden).

  `fused=True` calls `jax.nn.dot_product_attention` (cuDNN flash attention on GPU, XLA elsewhere), which never
  materialises the attention weights: no attention dropout and nothing sown for visualisation.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  fused: bool = False

  @nn.compact
  def __call__(self, x, *, deterministic, kv=None):
    """Self-attention over `x`, or with `kv` [batch, tokens, hidden] the queries of `x` attending to `kv`."""
    kv = x if kv is None else kv
    hidden = x.shape[-1]
    if hidden % self.num_heads:
      raise UserError(f"hidden size {hidden} is not divisible by num_heads={self.num_heads}")
    head_dim = hidden // self.num_heads
    project = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, dot_general=precision.dot_general,
        kernel_init=nn.initializers.xavier_uniform(), name=name)
    query, key, value = (project(name)(inputs).astype(self.dtype)
                         for name, inputs in (("query", x), ("key", kv), ("value", kv)))
    if self.fused:
      if self.dropout_rate > 0:
        raise UserError(f"attention_dropout_rate={self.dropout_rate} needs the unfused attention; "
                        "set fused_attention=False or the dropout to 0")
      out = jax.nn.dot_product_attention(query, key, value)
    else:
      out = self._attend(query, key, value, deterministic)
    return nn.DenseGeneral(hidden, axis=(-2, -1), dtype=self.dtype, dot_general=precision.dot_general,
                           kernel_init=nn.initializers.xavier_uniform(), name="out")(out)

  def _attend(self, query, key, value, deterministic):
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # (batch, tokens, heads, d) <-> (batch, heads, tokens, d)
    query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    logits = precision.attention_logits(heads_major(query), heads_major(key))
    weights = jax.nn.softmax(logits, axis=-1)
    # Kept only when the caller asks (`mutable=["intermediates"]`): attention maps for visualisation.
    self.sow("intermediates", "attention_weights", weights)
    if self.dropout_rate > 0 and not deterministic:
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
    out = precision.attention_mix(weights.astype(self.dtype), heads_major(value))
    return heads_major(out.astype(self.dtype))


def drop_path(module, x, rate, deterministic):
  """Stochastic depth (Huang et al. 2016): zero a residual branch `x` per example with probability `rate` and scale
  the kept ones by 1 / (1 - rate); a fresh key from `module`'s "dropout" stream. `rate` may be traced (scan)."""
  if deterministic:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x.astype(jnp.float32) / keep, 0.0)


def drop_path_rates(stochastic_depth, num_layers):
  """The linear rule over depth (as timm): block i drops with rate stochastic_depth * i / (num_layers - 1)."""
  return np.linspace(0.0, stochastic_depth, num_layers, dtype=np.float32)


class Encoder1DBlock(nn.Module):
  """Pre-LayerNorm transformer block (names as in the zoo's pre-Linen checkpoints).

  `drop_rate` is this block's stochastic depth, applied to both residual branches; None (not 0.0, which under
  scan may be traced) leaves the block exactly the zoo's.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  fused_attention: bool = False
  scanned: bool = False  # under `nn.scan`: return (carry, per-step output)
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  layer_scale_init: Optional[float] = None  # LayerScale (CaiT, DeiT III): per-channel branch gains `ls1`, `ls2`

  @nn.compact
  def __call__(self, x, deterministic, drop_rate=None):  # positional: `nn.remat` marks it static by position
    def branch(y, name):
      if self.layer_scale_init is not None:
        gain = self.param(name, nn.initializers.constant(self.layer_scale_init), (y.shape[-1],))
        y = y * gain.astype(y.dtype)
      return y if drop_rate is None else drop_path(self, y, drop_rate, deterministic)

    y = _layer_norm("LayerNorm_0", self.layer_norm_eps)(x).astype(self.dtype)
    y = MultiHeadDotProductAttention(self.num_heads, self.attention_dropout_rate, self.dtype, self.fused_attention,
                                     name="MultiHeadDotProductAttention_1")(y, deterministic=deterministic)
    x = x + branch(nn.Dropout(self.dropout_rate)(y, deterministic=deterministic), "ls1")
    y = _layer_norm("LayerNorm_2", self.layer_norm_eps)(x).astype(self.dtype)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, self.gelu_approximate, name="MlpBlock_3")(
        y, deterministic=deterministic)
    x = x + branch(y, "ls2")
    return (x, None) if self.scanned else x


class Encoder(nn.Module):
  """Position embedding, `num_layers` blocks and the final norm; the residual stream is float32.

  `scan_layers=True` runs one block under `nn.scan` (compile time independent of depth); its parameters are then
  stacked along a leading layer axis under `encoderblock/` instead of `encoderblock_{i}/` (see `stack_layers`).
  `stochastic_depth` is the drop-path rate of the last block (`drop_path_rates`); training only.
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  fused_attention: bool = False
  remat: str = "none"
  scan_layers: bool = False
  stochastic_depth: float = 0.0
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  layer_scale_init: Optional[float] = None
  final_norm: bool = True  # False when the model normalises after pooling instead (`fc_norm`)
  no_embed_class: bool = False

  @nn.compact
  def __call__(self, x, *, train, keep=None, prefix=None):
    """`x` [batch, patches, hidden]; `prefix` [batch, p, hidden]: the class and register tokens put in front, after
    the position embeddings are added to the patches alone (`no_embed_class`, DeiT III and timm's register models)
    or before, so that the embeddings cover them too (the zoo's). `keep` [batch, k]: indices of the patches that go
    on to the blocks once position embeddings are added (MAE's visible patches); None keeps all."""
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"unknown remat policy {self.remat!r}; use one of {', '.join(REMAT_POLICIES)}")
    block = Encoder1DBlock
    if self.remat != "none":
      block = nn.remat(Encoder1DBlock, policy=REMAT_POLICIES[self.remat], static_argnums=(2,))
    x = x.astype(jnp.float32)
    num_prefix = 0 if prefix is None else prefix.shape[1]
    embed_position = AddPositionEmbs(name="posembed_input")
    if self.no_embed_class:
      x = embed_position(x)
    if num_prefix:
      x = jnp.concatenate([prefix.astype(jnp.float32), x], axis=1)
    if not self.no_embed_class:
      x = embed_position(x)
    if keep is not None:
      kept = jnp.take_along_axis(x[:, num_prefix:], keep[..., None], axis=1)
      x = jnp.concatenate([x[:, :num_prefix], kept], axis=1)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    block_args = (self.mlp_dim, self.num_heads, self.dropout_rate, self.attention_dropout_rate, self.dtype,
                  self.fused_attention)
    numerics = dict(layer_norm_eps=self.layer_norm_eps, gelu_approximate=self.gelu_approximate,
                    layer_scale_init=self.layer_scale_init)
    # Per-layer drop-path rates, only when training with stochastic depth: otherwise the blocks are the zoo's.
    rates = drop_path_rates(self.stochastic_depth, self.num_layers) if train and self.stochastic_depth else None
    if self.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                        split_rngs={"params": True, "dropout": True}, length=self.num_layers,
                        in_axes=nn.broadcast if rates is None else (nn.broadcast, 0))
      extra = () if rates is None else (jnp.asarray(rates),)
      x, _ = scanned(*block_args, scanned=True, **numerics, name="encoderblock")(x, not train, *extra)
    else:
      for layer in range(self.num_layers):
        extra = () if rates is None or not rates[layer] else (float(rates[layer]),)
        x = block(*block_args, **numerics, name=f"encoderblock_{layer}")(x, not train, *extra)
    return _layer_norm("encoder_norm", self.layer_norm_eps)(x) if self.final_norm else x


class MAPHead(nn.Module):
  """Multi-head attention pooling (big_vision's MAPHead; timm's `attn_pool`): a learned probe attends to the tokens,
  then a residual MLP on its LayerNorm. Parameter names are big_vision's (`probe`, `MultiHeadDotProductAttention_0`,
  `LayerNorm_0`, `MlpBlock_0`)."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  fused_attention: bool = False
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d))
    probe = jnp.broadcast_to(probe, (n, 1, d)).astype(self.dtype)
    y = MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype, fused=self.fused_attention,
                                     name="MultiHeadDotProductAttention_0")(
                                         probe, kv=x.astype(self.dtype), deterministic=True)
    y = y.astype(jnp.float32)
    z = _layer_norm("LayerNorm_0", self.layer_norm_eps)(y).astype(self.dtype)
    y = y + MlpBlock(self.mlp_dim, dtype=self.dtype, gelu_approximate=self.gelu_approximate, name="MlpBlock_0")(
        z, deterministic=True)
    return y[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier; `num_classes=0` or None returns the pre-logit features instead of logits.

  Classifiers: `token` (class token), `gap` (mean over patch tokens), `map` (attention pooling, `MAPHead`),
  `unpooled` (every patch token), `token_unpooled` (class token prepended, every token returned).

  Options of later ViTs (off by default, the zoo's model): `num_registers` learned tokens after the class token
  (Darcet et al. 2024; dropped from the output), `no_embed_class` (position embeddings on the patches only),
  `layer_scale_init` (LayerScale gains `ls1`/`ls2` per block), `fc_norm` (the final LayerNorm after pooling, as
  `fc_norm/`, instead of on every token).
  """
  num_classes: Optional[int]
  patches: Mapping[str, Any]
  transformer: Optional[Mapping[str, Any]]
  hidden_size: int
  resnet: Optional[Mapping[str, Any]] = None
  representation_size: Optional[int] = None
  classifier: str = "token"
  head_bias_init: float = 0.0
  model_name: Optional[str] = None
  dtype: Any = jnp.float32
  fused_attention: bool = False
  remat: str = "none"
  scan_layers: bool = False
  stochastic_depth: float = 0.0  # drop-path rate of the last encoder block, linear over depth; training only
  # The zoo's numerics; Hugging Face transformers' ViT uses eps 1e-12 and the exact GELU (`models/hf.py`).
  layer_norm_eps: float = 1e-6
  gelu_approximate: bool = True
  num_registers: int = 0
  no_embed_class: bool = False
  layer_scale_init: Optional[float] = None
  fc_norm: bool = False

  @nn.compact
  def __call__(self, images, *, train=False, patch_transform=None, keep=None):
    """Logits (or features). For self-supervised objectives: `patch_transform` maps the patch embeddings
    [batch, patches, hidden] before the class token and position embeddings (masked patch prediction's
    corruption); `keep` [batch, k] picks the patches the encoder sees (MAE; see `Encoder`)."""
    if self.classifier not in CLASSIFIERS:
      raise UserError(f"unknown classifier {self.classifier!r}; use one of {', '.join(CLASSIFIERS)}")
    stride = geometry.downsampling(self.patches, self.resnet)
    height, width = images.shape[1:3]
    if height % stride[0] or width % stride[1]:
      raise UserError(
          f"image size {height}x{width} is not divisible by the patch size {stride[0]}x{stride[1]} of "
          f"{self.model_name or 'this model'}; use a multiple, e.g. "
          f"{max(1, round(height / stride[0])) * stride[0]}x{max(1, round(width / stride[1])) * stride[1]}")
    dtype = jnp.dtype(self.dtype)
    x = images.astype(dtype)
    if self.resnet is not None:
      x = resnet.resnet_stem(x, num_layers=tuple(self.resnet["num_layers"]),
                             width_factor=self.resnet["width_factor"], dtype=dtype)
    patch = tuple(self.patches["size"])
    x = nn.Conv(self.hidden_size, patch, strides=patch, padding="VALID", dtype=dtype,
                conv_general_dilated=precision.conv_general_dilated,
                name="embedding")(x)

    if self.transformer is not None:
      n, h, w, c = x.shape
      x = jnp.reshape(x, (n, h * w, c))
      if patch_transform is not None:
        x = patch_transform(x)
      prefix = []
      num_cls = int(self.classifier in geometry.TOKEN_CLASSIFIERS)
      if num_cls:
        prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, c)))
      if self.num_registers:
        prefix.append(self.param("reg", nn.initializers.normal(stddev=1e-6), (1, self.num_registers, c)))
      prefix = jnp.broadcast_to(jnp.concatenate(prefix, axis=1), (n, sum(p.shape[1] for p in prefix), c)) if (
          prefix) else None
      x = Encoder(**self.transformer, dtype=dtype, fused_attention=self.fused_attention, remat=self.remat,
                  scan_layers=self.scan_layers, stochastic_depth=self.stochastic_depth,
                  layer_norm_eps=self.layer_norm_eps, gelu_approximate=self.gelu_approximate,
                  layer_scale_init=self.layer_scale_init, final_norm=not self.fc_norm,
                  no_embed_class=self.no_embed_class, name="Transformer")(x, train=train, keep=keep, prefix=prefix)
      if self.num_registers:  # registers only carry computation: the outputs are the class and patch tokens
        x = jnp.concatenate([x[:, :num_cls], x[:, num_cls + self.num_registers:]], axis=1)

    if self.classifier == "token":
      x = x[:, 0]
    elif self.classifier == "gap":
      x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    elif self.classifier == "map":
      if self.transformer is None:
        raise UserError("classifier='map' pools the tokens of a transformer; this model has none")
      x = MAPHead(self.transformer["num_heads"], self.transformer["mlp_dim"], dtype=dtype,
                  fused_attention=self.fused_attention, layer_norm_eps=self.layer_norm_eps,
                  gelu_approximate=self.gelu_approximate, name="MAPHead_0")(x)
    if self.fc_norm:
      x = _layer_norm("fc_norm", self.layer_norm_eps)(x)

    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=dtype, dot_general=precision.dot_general, name="pre_logits")(x)
      x = nn.tanh(x)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=dtype, dot_general=precision.dot_general, kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init), name="head")(x)
    return x.astype(jnp.float32)


_BLOCK = re.compile(r"^encoderblock_(\d+)$")


def stack_layers(params):
  """Zoo layout -> scanned layout: `Transformer/encoderblock_{i}/...` stacked into `Transformer/encoderblock/...`."""
  encoder = dict(params["Transformer"])
  blocks = sorted((int(m.group(1)), encoder.pop(key)) for key in list(encoder) if (m := _BLOCK.match(key)))
  if not blocks:
    return params
  encoder["encoderblock"] = jax.tree.map(lambda *layers: np.stack(layers), *[block for _, block in blocks])
  return {**params, "Transformer": encoder}


def unstack_layers(params):
  """Scanned layout -> zoo layout (the inverse of `stack_layers`); zoo-layout params pass through unchanged."""
  encoder = dict(params.get("Transformer", {}))
  if "encoderblock" not in encoder:
    return params
  stacked = encoder.pop("encoderblock")
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for layer in range(num_layers):
    encoder[f"encoderblock_{layer}"] = jax.tree.map(lambda x, i=layer: x[i], stacked)
  return {**params, "Transformer": encoder}
