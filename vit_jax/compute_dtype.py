"""The compute dtype of matmuls and convolutions (config key `dtype`, benchmark flag `--dtype`).

`auto` (the default) is bfloat16 on GPU and TPU, and on CPUs whose instruction set multiplies bfloat16 natively
(AVX512-BF16, AMX-BF16): there a bf16 x bf16 -> f32 matmul runs ~2x float32 and ViT training ~1.5x. Other CPUs
(AVX2-only x86 such as AMD Zen 3, or any CPU whose flags we cannot read) emulate bfloat16 and lose on it, so `auto`
is float32 there: ViT-Ti-sized training 12-14% faster than bfloat16 and inference 1.3x on a Zen 3 host
(docs/benchmarks.md). Parameters and optimizer state are float32 either way.
"""
import jax.numpy as jnp

from vit_jax.errors import UserError

AUTO = "auto"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CHOICES = (AUTO, *DTYPES)
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


def resolve(name: str, platform: str, cpuinfo_path: str = CPUINFO) -> str:
  """`float32` or `bfloat16`: `name` itself, or what `auto` means on `platform` ('cpu', 'gpu', 'tpu')."""
  if name == AUTO:
    if platform != "cpu" or cpu_has_bf16_matmul(cpuinfo_path):
      return "bfloat16"
    return "float32"
  if name not in DTYPES:
    raise UserError(f"unknown dtype {name!r}; use one of {', '.join(CHOICES)}")
  return name
