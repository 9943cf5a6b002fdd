"""Prepares a TFDS catalog dataset in ArrayRecord format, for random access by the training pipeline.

  python -m vit_jax.tools.prepare_data --dataset=cifar10 [--tfds_data_dir=DIR] [--manual_dir=DIR]

TFDS shows download and generation progress bars. Builders that encode images from arrays (cifar10,
cifar100, mnist, ...) need TensorFlow for that step only: pip install 'vit_jax[tfds]' (tensorflow-cpu).

Without a network the download fails in seconds, not after TFDS's minutes of retries: the hosts of the dataset's
files are probed first (skipped behind a proxy), and when one cannot be reached TFDS retries only briefly. The error
names the files to download elsewhere and the folder to put them in (TFDS's manual dir, `--manual_dir`).
"""
import contextlib
import os
import socket
import urllib.error
import urllib.parse
import urllib.request

from absl import flags

from vit_jax.data import sources
from vit_jax.errors import UserError
from vit_jax.tools import cli

FLAGS = flags.FLAGS
PROBE_TIMEOUT_S = 5.0  # per host: a reachable host answers a TCP connect well within it
_MAX_HOSTS_PROBED = 5  # a dataset with files on more hosts gets the first ones probed
_RETRIES_WHEN_UNREACHABLE = 1  # TFDS's own: 10 with exponential back-off, minutes for a host that is not there
_URLS_SHOWN = 3


def define_flags():
  cli.define_flags("dataset", "tfds_data_dir")
  flags.DEFINE_string("manual_dir", None, "Folder with manually downloaded files (imagenet2012; any dataset's "
                                          "files when this machine cannot download them).")


def unreachable_hosts(urls, timeout_s=PROBE_TIMEOUT_S):
  """{host: reason} of the URLs' hosts a TCP connection cannot be opened to (name lookup or connect) within
  `timeout_s`. Empty behind a proxy: downloads go through it, so a direct connection proves nothing."""
  if urllib.request.getproxies():
    return {}
  hosts = {}
  for url in urls:
    parts = urllib.parse.urlparse(url)
    if parts.hostname and parts.scheme in ("http", "https", "ftp"):
      hosts.setdefault(parts.hostname, parts.port or {"http": 80, "https": 443, "ftp": 21}[parts.scheme])
  unreachable = {}
  for host, port in list(hosts.items())[:_MAX_HOSTS_PROBED]:
    try:
      socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
      unreachable[host] = " ".join(str(e).split()) or type(e).__name__
  return unreachable


@contextlib.contextmanager
def _tfds_retries(count):
  """TFDS's download retries set to `count` (a module constant it reads on each download) for the block."""
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top
  saved = downloader.MAX_RETRIES
  downloader.MAX_RETRIES = count
  try:
    yield
  finally:
    downloader.MAX_RETRIES = saved


def _download_failure(name, urls, manual_dir, unreachable, error):
  """The UserError for a failed download: why, which files to fetch elsewhere, and where to put them."""
  if unreachable:
    reason = "; ".join(f"cannot reach {host}: {why}" for host, why in unreachable.items())
  else:
    reason = " ".join(str(error).split())[:300] or type(error).__name__
  shown = " ".join(urls[:_URLS_SHOWN]) + (f" and {len(urls) - _URLS_SHOWN} more" if len(urls) > _URLS_SHOWN else "")
  files = f"download {shown}" if urls else "download the dataset's files (its TFDS catalog page lists them)"
  return UserError(f"downloading {name!r} failed ({reason}); check this machine's network connection or proxy, or "
                   f"{files} on a machine that has one and put them in {manual_dir} (TFDS's manual dir; "
                   "--manual_dir=DIR names another), then rerun this command")


def prepare(name: str, data_dir=None, manual_dir=None):
  """Downloads and writes `name` as ArrayRecord; returns the builder. UserError on anything the user can fix."""
  import requests  # pylint: disable=g-import-not-at-top  (TFDS downloads with it)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import download_manager  # pylint: disable=g-import-not-at-top
  if sources.dataset_kind(name) != "tfds":
    raise UserError(f"--dataset={name!r} is not a TFDS name; 'digits' and image folders need no preparation")
  builder = sources.tfds_builder(name, data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  # TFDS's default manual dir; a registered file found there is used instead of downloading it.
  manual_dir = os.fspath(manual_dir or builder.data_dir_root / "downloads" / "manual")
  infos = builder.url_infos or {}
  urls = [url for url, info in infos.items()
          if not (info.filename and os.path.exists(os.path.join(manual_dir, info.filename)))]
  unreachable = unreachable_hosts(urls)
  # Fewer retries only when a host is already known to be unreachable: a cached download still needs none.
  retries = _tfds_retries(_RETRIES_WHEN_UNREACHABLE) if unreachable else contextlib.nullcontext()
  tfds.display_progress_bar(True)
  try:
    with retries:
      builder.download_and_prepare(
          file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except (requests.RequestException, urllib.error.URLError, tfds.download.DownloadError) as e:
    raise _download_failure(name, urls, manual_dir, unreachable, e) from None
  except download_manager.NonMatchingChecksumError as e:  # a partial or different file, e.g. in the manual dir
    detail = " ".join(str(e).split("To debug")[0].split())
    raise UserError(f"preparing {name!r} failed: {detail}; delete that file and download it again") from None
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] == "tensorflow":
      raise UserError(f"preparing {name!r} needs TensorFlow to encode its images: pip install 'vit_jax[tfds]' "
                      "(tensorflow-cpu), then rerun this command; training itself does not need it") from None
    raise
  except AssertionError as e:  # TFDS asserts on a missing manual_dir
    if "manual" in str(e).lower():
      raise UserError(f"{name!r} needs files you download yourself: {' '.join(str(e).split())[:400]} "
                      "Then pass --manual_dir=DIR") from None
    raise
  return builder


def main():
  if not FLAGS.dataset:
    raise UserError("--dataset is required, e.g. --dataset=cifar10")
  builder = prepare(FLAGS.dataset, FLAGS.tfds_data_dir, FLAGS.manual_dir)
  print(f"{FLAGS.dataset} is ready in {builder.data_dir}: train with --config.dataset={FLAGS.dataset}"
        + (f" --config.tfds_data_dir={FLAGS.tfds_data_dir}" if FLAGS.tfds_data_dir else ""))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
