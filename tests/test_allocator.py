"""The CLIs' re-exec with a faster allocator: the rule, and real processes that keep (or advise) their memory."""
import json
import os
import platform
import subprocess
import sys

import pytest

from vit_jax.host import allocator
from vit_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIMALLOC = "/site/cmeel.prefix/lib/libmimalloc.so.3"
HOST = dict(system="Linux", glibc=(2, 36), thp="madvise", mimalloc=MIMALLOC)
NO_MIMALLOC = dict(HOST, mimalloc=None)
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def changes(environ, **host):
  """What the rule adds or changes in `environ` (None: no re-exec), without the restart's bookkeeping."""
  result = allocator.allocator_environment(environ, **host)
  if result is None:
    return None
  restart = json.loads(result.pop(allocator.RESTART_VARIABLE))
  assert restart["before"] == {name: environ.get(name) for name in restart["before"]}  # what it changed, as it was
  assert restart["allocator"] == ("mimalloc" if "LD_PRELOAD" in restart["before"] else "glibc huge pages")
  return {name: value for name, value in result.items() if environ.get(name) != value}


@pytest.mark.parametrize("environ,host,expected", [
    ({}, HOST, {"LD_PRELOAD": MIMALLOC, "MIMALLOC_PURGE_DELAY": "-1"}),
    ({"LD_PRELOAD": "/lib/libfoo.so"}, HOST, {"LD_PRELOAD": f"{MIMALLOC}:/lib/libfoo.so",
                                              "MIMALLOC_PURGE_DELAY": "-1"}),
    ({"MIMALLOC_PURGE_DELAY": "100"}, HOST, {"LD_PRELOAD": MIMALLOC}),  # the user's mimalloc settings are kept
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, HOST, None),  # the user's allocator is kept
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, NO_MIMALLOC, None),
    ({}, NO_MIMALLOC, {"GLIBC_TUNABLES": HUGE_PAGES}),
    ({}, dict(HOST, mimalloc="/home/a b/lib/libmimalloc.so.3"), {"GLIBC_TUNABLES": HUGE_PAGES}),  # not preloadable
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, NO_MIMALLOC,
     {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES}"}),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, NO_MIMALLOC, None),  # the user's choice (here: off)
    ({}, dict(NO_MIMALLOC, thp="always"), None),  # the kernel already backs large mappings with huge pages
    ({}, dict(NO_MIMALLOC, thp="never"), None),
    ({}, dict(NO_MIMALLOC, thp=None), None),  # no transparent huge pages in this kernel
    ({}, dict(NO_MIMALLOC, glibc=(2, 34)), None),  # before the tunable existed
    ({}, dict(NO_MIMALLOC, glibc=None), None),  # musl
    ({}, dict(HOST, system="Darwin"), None),
    ({"VIT_JAX_ALLOCATOR": "glibc"}, HOST, {"GLIBC_TUNABLES": HUGE_PAGES}),
    ({"VIT_JAX_ALLOCATOR": "mimalloc"}, HOST, {"LD_PRELOAD": MIMALLOC, "MIMALLOC_PURGE_DELAY": "-1"}),
    ({"VIT_JAX_ALLOCATOR": "system"}, HOST, None),
    ({allocator.RESTART_VARIABLE: "{}"}, HOST, None),  # already re-executed: never twice
])
def test_allocator_environment(environ, host, expected):
  assert changes(dict(environ, PATH="/bin"), **host) == expected


@pytest.mark.parametrize("environ,message", [
    ({"VIT_JAX_ALLOCATOR": "jemalloc"}, "VIT_JAX_ALLOCATOR='jemalloc' is not an allocator choice"),
    ({"VIT_JAX_ALLOCATOR": "mimalloc"}, "no cmeel-mimalloc library can be preloaded"),
])
def test_allocator_choice_errors_name_the_value(environ, message):
  with pytest.raises(UserError, match=message):
    allocator.allocator_environment(environ, **NO_MIMALLOC)


def test_restarted_process_gets_the_users_environment_back():
  started = {"PATH": "/bin", "LD_PRELOAD": "/lib/libfoo.so"}
  environ = allocator.allocator_environment(started, **HOST)
  assert environ["LD_PRELOAD"] != started["LD_PRELOAD"] and "MIMALLOC_PURGE_DELAY" in environ
  assert allocator.restored_environment(dict(environ, OTHER="1")) == (dict(started, OTHER="1"), "mimalloc")
  environ = allocator.allocator_environment(started, **NO_MIMALLOC)
  assert allocator.restored_environment(environ) == (started, "glibc huge pages")
  assert allocator.restored_environment(started) == (started, None)  # not re-executed: unchanged


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert allocator.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert allocator.thp_mode(str(path)) == "always"
  assert allocator.thp_mode(str(tmp_path / "missing")) is None


# Prints its pid on each start. After the re-exec: touches a 256 MiB malloc, frees it, touches a new one, and
# reports the page faults of the second round, whether mimalloc is mapped, whether the kernel's map of the block
# says "hg" (advised for transparent huge pages), and the allocator variables a subprocess would inherit.
_PROBE = r"""
import ctypes, json, os, resource, sys
print(json.dumps({"start": os.getpid()}), flush=True)
from vit_jax.host import allocator
restarted = allocator.reexec_with_fast_allocator()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def touched_block():
  address = libc.malloc(size)
  ctypes.memset(address, 1, size)
  return address
libc.free(touched_block())
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
address = touched_block()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
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
mapped = open("/proc/self/maps").read()
inherited = {k: v for k, v in os.environ.items() if k in ("LD_PRELOAD", "GLIBC_TUNABLES") or "ALLOCATOR" in k
             or k.startswith("MIMALLOC_")}
print(json.dumps({"allocator": allocator.describe(restarted), "mimalloc_mapped": "libmimalloc" in mapped,
                  "second_block_faults": faults, "advised": advised, "environment": inherited}), flush=True)
"""


def _run_probe(**env):
  environ = {k: v for k, v in os.environ.items()
             if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", allocator.CHOICE_VARIABLE, allocator.RESTART_VARIABLE)
             and not k.startswith("MIMALLOC_")}
  environ.update(env)
  result = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=60, check=False)
  return result, [json.loads(line) for line in result.stdout.splitlines()]


# Where setup.py installs cmeel-mimalloc.
mimalloc_platform = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="vit_jax installs mimalloc on Linux x86_64 and aarch64")


@mimalloc_platform
def test_mimalloc_is_installed_with_vit_jax():
  assert allocator.mimalloc_library() is not None and os.path.exists(allocator.mimalloc_library())


@mimalloc_platform
@pytest.mark.slow
def test_reexec_with_mimalloc_reuses_freed_memory():
  result, (first, second, report) = _run_probe()
  assert first["start"] == second["start"], result.stderr  # the same process, started over once
  assert report["allocator"] == "mimalloc" and report["mimalloc_mapped"]
  assert report["environment"] == {}  # subprocesses start in the user's environment
  # The freed block is reused: a few faults, not one per 4 KiB page (65,536) or per 2 MiB page (128).
  assert report["second_block_faults"] < 100, report

  # No re-exec: glibc unmaps the block and faults the next one in again, at least once per 2 MiB page.
  result, (first, report) = _run_probe(VIT_JAX_ALLOCATOR="system")
  assert report["allocator"] == "system" and not report["mimalloc_mapped"]
  assert report["second_block_faults"] >= 128, report


@pytest.mark.slow
@pytest.mark.skipif(allocator.allocator_environment({}, **dict(NO_MIMALLOC, system=platform.system(),
                                                               glibc=allocator.glibc_version(),
                                                               thp=allocator.thp_mode())) is None,
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages in madvise mode")
def test_reexec_with_glibc_huge_pages_advises_large_allocations():
  result, (first, second, report) = _run_probe(VIT_JAX_ALLOCATOR="glibc")
  assert first["start"] == second["start"], result.stderr
  assert report["allocator"] == "glibc huge pages" and report["advised"] and not report["mimalloc_mapped"]
  assert report["environment"] == {"VIT_JAX_ALLOCATOR": "glibc"}
  result, (first, report) = _run_probe(VIT_JAX_ALLOCATOR="glibc", GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
  assert report["allocator"] == "system" and report["advised"] is False  # the user's own setting wins


@pytest.mark.slow
def test_bad_choice_is_one_error_line():
  result, starts = _run_probe(VIT_JAX_ALLOCATOR="tcmalloc")
  assert result.returncode == 2 and len(starts) == 1
  assert result.stderr.startswith("error: VIT_JAX_ALLOCATOR='tcmalloc' is not an allocator choice")
  assert len(result.stderr.splitlines()) == 1
