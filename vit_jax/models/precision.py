"""Matmuls and convolutions that accumulate in float32 whatever the operand dtype.

With bfloat16 operands this is what uses CPU AMX and GPU tensor cores at full rate (bf16 x bf16 -> bf16 dots are
slower on CPU and lose precision); with float32 operands it is the plain operation.
"""
import functools

import jax
import jax.numpy as jnp

dot_general = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
conv_general_dilated = functools.partial(jax.lax.conv_general_dilated, preferred_element_type=jnp.float32)
