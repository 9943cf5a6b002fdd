"""The CLIs' re-exec with glibc's huge-page tunable: when it applies, and that large allocations end up advised."""
import json
import os
import platform
import subprocess
import sys

import pytest

from vit_jax import huge_pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX_GLIBC = dict(system="Linux", glibc=(2, 36), mode="madvise")


@pytest.mark.parametrize("tunables,expected", [
    (None, "glibc.malloc.hugetlb=1"),
    ("", "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", None),  # the user's choice (here: off) is kept
    ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2", None),
])
def test_tunables_with_huge_pages(tunables, expected):
  assert huge_pages.tunables_with_huge_pages(tunables) == expected


@pytest.mark.parametrize("host,applies", [
    (LINUX_GLIBC, True),
    (dict(LINUX_GLIBC, mode="always"), False),  # the kernel already backs large mappings with huge pages
    (dict(LINUX_GLIBC, mode="never"), False),
    (dict(LINUX_GLIBC, mode=None), False),  # no transparent huge pages in this kernel
    (dict(LINUX_GLIBC, glibc=(2, 34)), False),  # before the tunable existed
    (dict(LINUX_GLIBC, glibc=None), False),  # musl
    (dict(LINUX_GLIBC, system="Darwin"), False),
])
def test_huge_page_environment_only_where_it_helps(host, applies):
  environ = {"PATH": "/bin", "XLA_FLAGS": "--xla_foo"}
  result = huge_pages.huge_page_environment(environ, **host)
  if applies:
    assert result == dict(environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
  else:
    assert result is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert huge_pages.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert huge_pages.thp_mode(str(path)) == "always"
  assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


# Prints its pid on each start; after the re-exec, mallocs 64 MiB (glibc serves it with its own mmap) and reports
# whether the kernel's map of that region says "hg" (advised for transparent huge pages).
_PROBE = r"""
import ctypes, json, os, sys
print(json.dumps({"start": os.getpid()}), flush=True)
from vit_jax import huge_pages
huge_pages.reexec_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
address = libc.malloc(size)
ctypes.memset(address, 1, size)
advised = None
with open("/proc/self/smaps") as f:
  inside = False
  for line in f:
    fields = line.split()
    if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: start-end perms offset dev inode
      start, end = (int(x, 16) for x in fields[0].split("-"))
      inside = start <= address < end
    elif inside and fields[0] == "VmFlags:":
      advised = "hg" in fields[1:]
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "advised": advised}), flush=True)
"""


def _run_probe(**env):
  environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  environ.update(env)
  result = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=60, check=True)
  return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.skipif(huge_pages.huge_page_environment({}, system=platform.system(), glibc=huge_pages.glibc_version(),
                                                     mode=huge_pages.thp_mode()) is None,
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")
def test_reexec_advises_large_allocations_for_huge_pages_and_keeps_an_opt_out():
  first, second, report = _run_probe()
  assert first["start"] == second["start"]  # the same process, started over once
  assert report == {"tunables": "glibc.malloc.hugetlb=1", "advised": True}

  # The user's own setting wins: no re-exec, and the same allocation is not advised.
  first, report = _run_probe(GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  assert report == {"tunables": "glibc.malloc.hugetlb=0", "advised": False}
