"""Listing image files: directory scans, globs and manifests, cached in the workdir.

Folders are listed once (directory scan, glob, or a manifest of paths), sorted, and cached under
`WORKDIR/file_lists/`, so restarts see the same files in the same order without rescanning.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
import uuid
from typing import Sequence

import numpy as np
from absl import logging
from etils import epath

from vae_scale.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def paths_digest(paths: Sequence[str]) -> str:
  """sha1 of the paths joined by newlines."""
  h = hashlib.sha1()
  for start in range(0, len(paths), 1 << 16):  # Chunks: millions of paths, bounded memory.
    h.update((("\n" if start else "") + "\n".join(paths[start:start + (1 << 16)])).encode())
  return h.hexdigest()


def _is_remote(path: str) -> bool:
  return "://" in path


def _has_image_extension(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS)


def _read_manifest(path: str) -> list[str]:
  """Paths listed one per line (blank lines and '#' comments skipped), relative to the manifest."""
  text = epath.Path(path).read_text(encoding="utf-8")
  base = path.rsplit("/", 1)[0] if _is_remote(path) else os.path.dirname(path)
  files = []
  for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    if _is_remote(line) or os.path.isabs(line):
      files.append(line)
    else:
      files.append(f"{base}/{line}" if _is_remote(base) else os.path.normpath(
          os.path.join(base, line)))
  return files


def _scan_local_dir(path: str) -> list[str]:
  files, seen = [], set()
  for root, dirs, names in os.walk(path, followlinks=True):
    st = os.stat(root)
    if (st.st_dev, st.st_ino) in seen:  # A symlink loop: walked already.
      dirs[:] = []
      continue
    seen.add((st.st_dev, st.st_ino))
    files.extend(os.path.join(root, n) for n in names if _has_image_extension(n))
  return files


def _scan_epath(path: str) -> list[str]:
  """A directory or glob on any filesystem etils knows (gs://, ...): `*` may match across '/'."""
  wild = re.search(r"[*?\[]", path)
  if wild is None:
    return [os.fspath(root / n) for root, _, names in epath.Path(path).walk()
            for n in names if _has_image_extension(n)]
  base = path[:wild.start()].rsplit("/", 1)[0]
  pattern = path.replace("**/", "*")  # fnmatch's '*' crosses '/', so '**/' is just '*'.
  return [os.fspath(root / n) for root, _, names in epath.Path(base).walk() for n in names
          if _has_image_extension(n) and fnmatch.fnmatchcase(os.fspath(root / n), pattern)]


def _scan(path: str) -> list[str]:
  """Image files under a directory or matching a glob (unsorted)."""
  if _is_remote(path):
    return _scan_epath(path)
  if any(ch in path for ch in "*?["):
    return [p for p in glob.glob(path, recursive=True)
            if _has_image_extension(p) and os.path.isfile(p)]
  return _scan_local_dir(path)


def _cache_files(cache_dir: str, path: str) -> tuple[epath.Path, epath.Path]:
  key = hashlib.sha1(path.encode()).hexdigest()[:16]
  folder = epath.Path(cache_dir) / "file_lists"
  return folder / f"{key}.txt", folder / f"{key}.json"


def _read_cache(cache_dir: str, path: str) -> list[str] | None:
  listing, meta_file = _cache_files(cache_dir, path)
  try:
    if not meta_file.exists():
      return None
    meta = json.loads(meta_file.read_text())
    files = listing.read_text(encoding="utf-8").split("\n") if meta["count"] else []
  except (OSError, ValueError, KeyError) as e:
    logging.warning("Ignoring unreadable file-list cache %s: %s", meta_file, e)
    return None
  if meta.get("path") != path or len(files) != meta["count"] or (
      paths_digest(files) != meta.get("sha1")):
    logging.warning("Ignoring file-list cache %s: it does not match %s", listing, path)
    return None
  logging.info("Using the cached list of %d files for %s from %s (delete it to rescan)",
               len(files), path, listing)
  return files


def _write_cache(cache_dir: str, path: str, files: list[str]) -> None:
  """Writes the listing, then its metadata (the commit marker), each by an atomic rename."""
  listing, meta_file = _cache_files(cache_dir, path)
  meta = {"path": path, "count": len(files), "sha1": paths_digest(files)}
  try:
    listing.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((listing, "\n".join(files)), (meta_file, json.dumps(meta, indent=1))):
      tmp = target.parent / f"{target.name}.tmp-{uuid.uuid4().hex}"
      tmp.write_text(text, encoding="utf-8")
      tmp.replace(target)
    logging.info("Cached the list of %d files for %s in %s", len(files), path, listing)
  except OSError as e:  # A read-only workdir costs a rescan next time, nothing more.
    logging.warning("Could not cache the file list in %s: %s", listing, e)


def list_image_files(path: str, cache_dir: str | None = None) -> list[str]:
  """Image files under a directory (recursive), matching a glob, or listed in a manifest (.txt).

  Args:
    path: a directory, a glob ('/data/**/*.jpg'), or a manifest file ending in '.txt' with one
      path per line (relative paths are relative to the manifest). Local or gs://.
    cache_dir: if given (the workdir), a directory or glob scan is stored in
      `cache_dir/file_lists/` and later calls with the same `path` read it instead of rescanning,
      so a restart sees the same files in the same order even if the folder has changed since.
      Delete the cache to pick up new files. Manifests are never cached: they are the list.
  Returns:
    Unique paths sorted lexicographically, so the order never depends on the filesystem.
  Raises:
    DataError: the path does not exist or holds no images.
  """
  path = os.fspath(path)
  if not _is_remote(path):
    path = os.path.abspath(path)
  is_glob = any(ch in path for ch in "*?[")
  if not is_glob and path.endswith(".txt") and epath.Path(path).is_file():
    files = sorted(set(_read_manifest(path)))
  else:
    if not is_glob and not epath.Path(path).is_dir():
      raise DataError(f"config.data.path={path!r} does not exist; give a directory of images, a "
                      "glob such as '/data/**/*.jpg', or a manifest .txt with one path per line")
    files = _read_cache(cache_dir, path) if cache_dir else None
    if files is None:
      files = set(_scan(path))
      odd = {f for f in files if "\n" in f}
      if odd:
        logging.warning("Ignoring %d files with a newline in their name, e.g. %r", len(odd),
                        next(iter(odd)))
      files = sorted(files - odd)
      if cache_dir and files:
        _write_cache(cache_dir, path, files)
  if not files:
    raise DataError(f"config.data.path={path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "point it at a folder with images in it")
  return files


def split_files(files: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
  """Holds out a deterministic `eval_fraction` of the files (at least one) for evaluation."""
  order = np.random.default_rng(seed).permutation(len(files))
  n_eval = max(1, int(round(eval_fraction * len(files)))) if len(files) > 1 else 0
  is_eval = np.zeros(len(files), bool)
  is_eval[order[:n_eval]] = True
  train = [f for f, e in zip(files, is_eval) if not e]
  held = [f for f, e in zip(files, is_eval) if e]
  return train, (held or train)
