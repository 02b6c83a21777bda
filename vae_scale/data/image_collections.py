"""Image collections to pack: a folder or glob, a manifest, or webdataset `.tar` shards.

`list_units` turns a `--src` string into work units in a fixed global order: chunks of image
files (folder, glob, manifest: `file_lists.list_image_files`, sorted), or one unit per `.tar`
shard (img2dataset's layout: `KEY.jpg` + `KEY.txt` caption + `KEY.json`). `read_unit` reads a
unit's items: each image's bytes, its key, and its caption when the collection has one. Units are
independent, so a process pool or Beam workers can read them in any order and a rerun can skip the
ones already done. Local paths or anything etils knows (gs://).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tarfile
from typing import Iterator, Sequence

from etils import epath

from vae_scale.data import file_lists
from vae_scale.errors import DataError

IMAGE_EXTENSIONS = file_lists.IMAGE_EXTENSIONS
SIDECAR_EXTENSIONS = (".txt", ".json")  # webdataset members that travel with an image.

# Why an item could not be read (the per-image work adds the decode reasons, see `packing`).
UNREADABLE, NOT_AN_IMAGE, NO_IMAGE, DUPLICATE_KEY = (
    "unreadable", "not_an_image", "no_image", "duplicate_key")


@dataclasses.dataclass(frozen=True)
class Unit:
  """A piece of a collection read as one task: a chunk of image files, or one `.tar` shard.

  Attributes:
    index: position in the global order of units (items are ordered by (index, position)).
    split: 'train' or 'validation' when the source names it (--src / --eval_src); '' when the
      split is drawn per image from --eval_fraction.
    root: the collection's root; keys are paths relative to it.
    files: the image files of a chunk (empty for a tar).
    tar: the `.tar` shard ('' for a chunk of files).
  """

  index: int
  split: str
  root: str
  files: tuple[str, ...] = ()
  tar: str = ""


@dataclasses.dataclass(frozen=True)
class Item:
  """One image of a unit as read from storage (not decoded yet).

  Attributes:
    key: unique within the collection: the path relative to the root ('a/b.jpg'), or
      'SHARD.tar/KEY' for a webdataset sample.
    where: where it is, for messages (a full path, or 'SHARD.tar:MEMBER').
    data: the image file's bytes; b'' when it could not be read.
    caption: the sample's caption ('' when none).
    reason: '' when `data` was read, else why not (UNREADABLE, NOT_AN_IMAGE, ...).
    message: what went wrong ('' when nothing did).
  """

  key: str
  where: str
  data: bytes
  caption: str = ""
  reason: str = ""
  message: str = ""


def expand_braces(pattern: str) -> list[str]:
  """webdataset's brace lists: 'a-{000..002}.tar' -> a-000.tar, a-001.tar, a-002.tar; '{x,y}'.

  Numeric ranges keep the width of their first bound (zero padding); several groups multiply.
  """
  match = re.search(r"\{([^{}]*)\}", pattern)
  if match is None:
    return [pattern]
  head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
  numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if numeric:
    lo, hi = numeric.groups()
    width = len(lo) if lo.startswith("0") else 0
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  else:
    options = body.split(",")
  return [p for option in options for p in expand_braces(head + option + tail)]


def _is_remote(path: str) -> bool:
  return "://" in path


def _glob(pattern: str) -> list[str]:
  if not _is_remote(pattern):
    return glob.glob(pattern, recursive=True)
  wild = re.search(r"[*?\[]", pattern)
  base = pattern[:wild.start()].rsplit("/", 1)[0]
  return [os.fspath(p) for p in epath.Path(base).glob(pattern[len(base) + 1:])]


def _root(paths: Sequence[str]) -> str:
  """The longest common directory of `paths`, ending in '/' (keys are paths relative to it)."""
  prefix = os.path.commonprefix(list(paths))
  return prefix[:prefix.rfind("/") + 1]


def _list_tars(patterns: list[str], src: str) -> list[str]:
  tars = set()
  for pattern in patterns:
    if re.search(r"[*?\[]", pattern):
      found = [p for p in _glob(pattern) if p.endswith(".tar")]
      if not found:
        raise DataError(f"--src={src!r}: {pattern!r} matches no .tar shards; check the glob")
      tars.update(found)
    elif epath.Path(pattern).is_file():
      tars.add(pattern)
    else:
      raise DataError(f"--src={src!r}: {pattern} does not exist; fix the path or the brace list")
  return sorted(tars)


def _list_files(patterns: list[str], src: str) -> list[str]:
  files = set()
  for pattern in patterns:
    try:
      files.update(file_lists.list_image_files(pattern))
    except DataError as e:
      what = "does not exist" if "does not exist" in str(e) else (
          f"holds no images ({', '.join(IMAGE_EXTENSIONS)})")
      raise DataError(f"--src={src!r}: {pattern} {what}; give a folder of images, a glob such as "
                      "'/data/**/*.jpg', a manifest .txt with one path per line, or webdataset "
                      "shards such as 'gs://b/shards-{00000..00099}.tar'") from e
  return sorted(files)


def list_units(src: str, *, split: str = "", chunk_size: int = 256,
               first_index: int = 0) -> list[Unit]:
  """The work units of a collection, in a fixed order.

  Args:
    src: a folder, a glob, a manifest `.txt`, or `.tar` shards (a path, glob or brace list such
      as 'gs://b/{00000..00099}.tar'); a brace list may also name several folders.
    split: the split every image of `src` goes to ('' = drawn from --eval_fraction).
    chunk_size: image files per unit (a tar is always one unit).
    first_index: the index of the first unit (units of --eval_src come before those of --src).
  Raises:
    DataError: `src` does not exist or holds no images (one line naming it).
  """
  patterns = expand_braces(os.fspath(src))
  patterns = [p if _is_remote(p) else os.path.abspath(p) for p in patterns]
  if all(p.endswith(".tar") for p in patterns):
    tars = _list_tars(patterns, src)
    root = _root([t.rsplit("/", 1)[0] + "/" for t in tars])
    return [Unit(first_index + i, split, root, tar=t) for i, t in enumerate(tars)]
  files = _list_files(patterns, src)
  root = _root(files)
  return [Unit(first_index + i, split, root, files=tuple(files[s:s + chunk_size]))
          for i, s in enumerate(range(0, len(files), chunk_size))]


# --------------------------------------------------------------------------- reading


def _read_bytes(path: str) -> bytes:
  if _is_remote(path):
    return epath.Path(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def _sidecar_caption(path: str) -> str:
  """The caption in 'STEM.txt' beside an image file ('' when there is none)."""
  stem = path[:path.rfind(".")] if "." in path.rsplit("/", 1)[-1] else path
  try:
    return _read_bytes(stem + ".txt").decode("utf-8", errors="replace").strip()
  except OSError:
    return ""


def _read_files(unit: Unit) -> Iterator[Item]:
  for path in unit.files:
    key = path[len(unit.root):]
    try:
      data = _read_bytes(path)
    except OSError as e:  # Gone since the listing, permissions, a flaky bucket: skipped, counted.
      yield Item(key, path, b"", reason=UNREADABLE, message=f"{type(e).__name__}: {e}")
      continue
    yield Item(key, path, data, caption=_sidecar_caption(path))


def _split_member(name: str) -> tuple[str, str]:
  """webdataset's (key, extension): the key is the path up to the first '.' of the basename."""
  folder, _, base = name.rpartition("/")
  stem, dot, ext = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


def _sample_item(unit: Unit, key: str, members: dict[str, bytes]) -> Item:
  """One webdataset sample (its members by extension) as an Item."""
  tar_name = unit.tar[len(unit.root):]
  full_key, where = f"{tar_name}/{key}", f"{unit.tar}:{key}"
  image_ext = next((e for e in members if e in IMAGE_EXTENSIONS), None)
  if image_ext is None:
    others = sorted(e or "(no extension)" for e in members if e not in SIDECAR_EXTENSIONS)
    if others:
      return Item(full_key, where + others[0], b"", reason=NOT_AN_IMAGE,
                  message=f"member {key}{others[0]} is not an image "
                  f"({', '.join(IMAGE_EXTENSIONS)})")
    return Item(full_key, where, b"", reason=NO_IMAGE,
                message=f"sample {key} has no image member (only {', '.join(sorted(members))})")
  caption = members.get(".txt", b"").decode("utf-8", errors="replace").strip()
  if not caption and ".json" in members:
    try:
      caption = str(json.loads(members[".json"]).get("caption") or "").strip()
    except (ValueError, AttributeError):  # Metadata is optional; a broken one costs the caption.
      caption = ""
  return Item(full_key, where + image_ext, members[image_ext], caption=caption)


def _read_tar(unit: Unit) -> Iterator[Item]:
  """The samples of a tar in stream order (one pass, no seeks: fine on gs://)."""
  seen: set[str] = set()
  key, members = None, {}
  try:
    with epath.Path(unit.tar).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as archive:
      for member in archive:
        if not member.isfile():
          continue
        member_key, ext = _split_member(member.name)
        if member_key != key and key is not None:
          yield _sample_item(unit, key, members) if key not in seen else Item(
              f"{unit.tar[len(unit.root):]}/{key}", f"{unit.tar}:{key}", b"",
              reason=DUPLICATE_KEY, message=f"sample {key} appears twice in the tar")
          seen.add(key)
          members = {}
        key = member_key
        members[ext] = archive.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError, ValueError) as e:
    raise DataError(f"{unit.tar}: truncated or not a tar ({type(e).__name__}: {e}); re-download "
                    "it, or leave it out of --src") from e
  if key is not None:
    yield _sample_item(unit, key, members) if key not in seen else Item(
        f"{unit.tar[len(unit.root):]}/{key}", f"{unit.tar}:{key}", b"", reason=DUPLICATE_KEY,
        message=f"sample {key} appears twice in the tar")


def read_unit(unit: Unit) -> Iterator[Item]:
  """The items of a unit, in order: a chunk's files as listed, a tar's samples as stored.

  Raises:
    DataError: a tar that is truncated or not a tar (one line naming it and what to do).
  """
  return _read_tar(unit) if unit.tar else _read_files(unit)
