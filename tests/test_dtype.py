"""`dtype=auto`: bfloat16 on accelerators and on CPUs with bf16 instructions, float32 on other CPUs."""
import jax.numpy as jnp
import ml_collections
import pytest

from vit_jax import train
from vit_jax.models import precision
from vit_jax.errors import UserError

# /proc/cpuinfo excerpts: an AMD Zen 4 (AVX512-BF16) and a Zen 3 (AVX2 only), as they list their first core.
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
flags\t\t: fpu vme avx avx2 avx512f avx512dq avx512_bf16 avx512_vnni
bugs\t\t: sysret_ss_attrs
"""
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse4_2 avx f16c fma avx2 vaes vpclmulqdq
"""
# A flag name elsewhere in the text (here in `bugs`) must not count.
MISLEADING = "processor\t: 0\nflags\t\t: avx2\nbugs\t\t: avx512_bf16\n"


def cpuinfo(tmp_path, text):
  path = tmp_path / "cpuinfo"
  path.write_text(text)
  return str(path)


def test_cpu_flags_come_from_the_flags_line():
  assert {"avx2", "avx512_bf16"} <= precision.cpu_flags(ZEN4)
  assert "avx512_bf16" not in precision.cpu_flags(MISLEADING)
  assert precision.cpu_flags("processor\t: 0\n") == set()


@pytest.mark.parametrize("text, expected", [(ZEN4, "bfloat16"), (ZEN3, "float32"), (MISLEADING, "float32"),
                                            ("flags\t\t: avx2 amx_bf16 amx_tile\n", "bfloat16")])
def test_auto_on_cpu_follows_its_bf16_instructions(tmp_path, text, expected):
  assert precision.resolve_dtype("auto", "cpu", cpuinfo(tmp_path, text)) == expected


def test_auto_on_cpu_is_float32_when_the_flags_cannot_be_read(tmp_path):
  assert precision.resolve_dtype("auto", "cpu", str(tmp_path / "missing")) == "float32"


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_auto_on_accelerators_is_bfloat16(tmp_path, platform):
  assert precision.resolve_dtype("auto", platform, cpuinfo(tmp_path, ZEN3)) == "bfloat16"


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_explicit_dtypes_are_kept_everywhere(tmp_path, name):
  for platform in ("cpu", "gpu"):
    assert precision.resolve_dtype(name, platform, cpuinfo(tmp_path, ZEN3)) == name


def test_unknown_dtype_names_the_value_and_the_choices():
  with pytest.raises(UserError, match="unknown dtype 'fp16'; use one of auto, float32, bfloat16"):
    precision.resolve_dtype("fp16", "cpu")


def test_training_builds_its_model_in_the_resolved_dtype():
  config = ml_collections.ConfigDict(dict(model_name="testing", model={}, dtype="auto"))
  assert train.create_model(config, 10, "gpu").dtype == jnp.bfloat16
  expected = jnp.bfloat16 if precision.cpu_has_bf16_matmul() else jnp.float32
  assert train.create_model(config, 10, "cpu").dtype == expected
  config.dtype = "float32"
  assert train.create_model(config, 10, "gpu").dtype == jnp.float32
