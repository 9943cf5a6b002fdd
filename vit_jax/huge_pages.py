"""CPU hosts: XLA's temporary buffers on transparent huge pages, through glibc's `glibc.malloc.hugetlb` tunable.

XLA:CPU allocates every execution's temporary buffers afresh (one ~450 MB block per device for the ViT-Ti train
step of docs/benchmarks.md). glibc serves a block that large with its own mmap and unmaps it on free, so each
step faults every 4 KiB page in again: 443,000 page faults and 0.65-0.8 s of kernel time in a 1.3 s step on a
2-core host. With `glibc.malloc.hugetlb=1` glibc advises those mappings for transparent huge pages (2 MiB): 2,700
faults, and the step takes 1.05 s. glibc reads its tunables once, when the process starts, so the training and
benchmark CLIs (`vit_jax.main`, `vit_jax.benchmark`) re-execute themselves once with the tunable added to
`GLIBC_TUNABLES` (`reexec_with_huge_pages`), before they parse flags or create devices.

Nothing happens where it cannot help: off Linux, with a libc other than glibc >= 2.35, or when the kernel's
transparent huge pages are not in `madvise` mode (`always` already uses them, `never` refuses them). A
`GLIBC_TUNABLES` that already sets `glibc.malloc.hugetlb` is the user's choice and is kept; `=0` turns this off.
GPU and TPU runs keep their device memory in the runtime's own allocator; on their hosts the tunable only changes
how the host's large allocations are backed.
"""
import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
  """The kernel's transparent huge page mode (`always`, `madvise` or `never`: the bracketed word), or None."""
  try:
    with open(path, encoding="ascii") as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> Optional[tuple]:
  library, version = platform.libc_ver()
  if library != "glibc" or not version:
    return None
  return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def tunables_with_huge_pages(tunables: Optional[str]) -> Optional[str]:
  """`GLIBC_TUNABLES` with `glibc.malloc.hugetlb=1` added, or None when it already names that tunable."""
  entries = [entry for entry in (tunables or "").split(":") if entry]
  if any(entry.partition("=")[0] == TUNABLE for entry in entries):
    return None
  return ":".join(entries + [f"{TUNABLE}=1"])


def huge_page_environment(environ: Mapping[str, str], *, system: str, glibc: Optional[tuple],
                          mode: Optional[str]) -> Optional[dict]:
  """The environment to re-execute with, or None when this process should run as it is."""
  if system != "Linux" or glibc is None or glibc < MIN_GLIBC or mode != "madvise":
    return None
  tunables = tunables_with_huge_pages(environ.get("GLIBC_TUNABLES"))
  if tunables is None:
    return None
  return dict(environ, GLIBC_TUNABLES=tunables)


def reexec_with_huge_pages():
  """Replaces this process by the same command with the tunable set, where it helps (see the module docstring).

  Call it first thing in a CLI's entry point: the new process starts over, and the exec keeps the process id,
  open files and the rest of the environment.
  """
  environ = huge_page_environment(os.environ, system=platform.system(), glibc=glibc_version(), mode=thp_mode())
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environ)
