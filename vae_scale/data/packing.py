"""The per-image work of packing a collection, done once: decode, shrink, re-encode or keep.

`pack_item` decodes an image with the trainer's own decoder (`transforms.load_image`: the same
files are unusable at prepare time as at train time, for the same reasons), shrinks one whose
shorter side exceeds `max_side` (bicubic, antialiased, as the trainer resizes) and stores it as a
JPEG of quality 95; a smaller one keeps its original bytes (no second lossy encode; EXIF and all,
which the trainer's decoder applies). `pack_unit` does it for a whole work unit; both the process
pool and the Beam pipeline call it, so both make the same records.

Then, over all records in their global order: exact duplicates (same file bytes) keep the first
(`Dedup`), and a seeded hash of the key draws the held-out split (`EvalDraw`), so neither depends
on the order work finishes in, and adding images never moves an old one between splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from vae_scale.data import transforms
from vae_scale.data import image_collections

# Skip reasons of the per-image work (besides image_collections' reading reasons).
EMPTY, TOO_LARGE, CORRUPT = "empty", "too_large", "corrupt"
TRAIN, VALIDATION = "train", "validation"


@dataclasses.dataclass(frozen=True)
class PackOptions:
  """What the per-image work does.

  Attributes:
    max_side: an image whose shorter side exceeds this is resized to it (pixels, >= the
      training crop: 512 leaves room for 256 crops at every scale augmentation uses).
    jpeg_quality: quality of the JPEG a resized image is stored as (1..100).
    max_pixels: width * height above which an image is skipped (the trainer's data.max_pixels).
  """

  max_side: int = 512
  jpeg_quality: int = 95
  max_pixels: int = transforms.DEFAULT_MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class Record:
  """One item after the per-image work.

  Attributes:
    ordinal: (unit index, position in the unit): the global order of the collection.
    key, where, caption: as `image_collections.Item`.
    split: the unit's split ('' = drawn per image).
    reason: '' when usable; else why it is skipped.
    message: what went wrong ('' when nothing did).
    sha256: hex digest of the original file bytes ('' when none were read).
    image: the bytes to store (b'' when skipped).
    height, width: the original image's size as displayed (EXIF orientation applied).
    source_bytes: size of the original file.
    resized: whether `image` is a re-encoded, shrunk copy (else the original bytes).
  """

  ordinal: tuple[int, int]
  key: str
  where: str
  split: str
  reason: str = ""
  message: str = ""
  sha256: str = ""
  image: bytes = b""
  height: int = 0
  width: int = 0
  caption: str = ""
  source_bytes: int = 0
  resized: bool = False


def _reason(error: transforms.BadImageError, data: bytes) -> str:
  text = str(error)
  if not data:
    return EMPTY
  if "exceeds data.max_pixels" in text:
    return TOO_LARGE
  if "not an image format" in text:
    return image_collections.NOT_AN_IMAGE
  return CORRUPT


def _displayed_size(data: bytes) -> tuple[int, int]:
  """(width, height) of an image file as shown: EXIF orientations 5-8 swap the sides."""
  with Image.open(io.BytesIO(data)) as img:
    w, h = img.size
    orientation = img.getexif().get(0x0112, 1)
  return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
  """uint8 RGB [H, W, 3] as a baseline JPEG with 4:2:0 chroma (explicit: the same bytes on any
  Pillow). Half-resolution chroma costs nothing at the default max_side = 2 x image_size: the
  trainer halves the image again (shorter side to image_size) before it crops, so the crop's
  chroma is full resolution; 4:4:4 would cost ~30% more bytes (measured on 1600x1200 photos)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling="4:2:0",
                              optimize=False, progressive=False)
  return buf.getvalue()


def pack_item(item: image_collections.Item, ordinal: tuple[int, int], split: str,
              options: PackOptions) -> Record:
  """Decodes `item` once; returns what to store, or why it is skipped (never raises)."""
  base = dict(ordinal=ordinal, key=item.key, where=item.where, split=split,
              caption=item.caption, source_bytes=len(item.data))
  if item.reason:
    return Record(**base, reason=item.reason, message=item.message)
  sha = hashlib.sha256(item.data).hexdigest()
  try:
    # A JPEG much larger than max_side decodes at 1/2..1/8 scale (never below max_side), as the
    # trainer's reduced_jpeg_decode does: several times faster, a box filter before the bicubic.
    image = transforms.load_image(item.data, options.max_pixels, min_size=options.max_side)
    width, height = _displayed_size(item.data)
  except transforms.BadImageError as e:
    message = str(e).replace("<bytes>", item.where, 1)
    return Record(**base, sha256=sha, reason=_reason(e, item.data), message=message)
  if min(width, height) <= options.max_side:
    return Record(**base, sha256=sha, image=item.data, height=height, width=width)
  small = transforms.resize_shorter_side(np.asarray(image), options.max_side)
  return Record(**base, sha256=sha, image=encode_jpeg(small, options.jpeg_quality),
                height=height, width=width, resized=True)


def pack_unit(unit: image_collections.Unit, options: PackOptions) -> Iterator[Record]:
  """Every item of `unit` after the per-image work, in the unit's order, one at a time.

  Raises:
    DataError: the unit is a truncated tar or not a tar.
  """
  for position, item in enumerate(image_collections.read_unit(unit)):
    yield pack_item(item, (unit.index, position), unit.split, options)


# --------------------------------------------------------------------------- duplicates, splits


class Dedup:
  """Keeps the first record of each content hash in the global order (`ordinal`).

  Fed in order (the local path), `keep` answers at once; `first_of` is the order-free rule the
  Beam pipeline applies per hash (the smallest ordinal wins), the same choice.
  """

  def __init__(self):
    self._seen: set[str] = set()

  def keep(self, record: Record) -> bool:
    if record.sha256 in self._seen:
      return False
    self._seen.add(record.sha256)
    return True

  @staticmethod
  def first_of(records: Iterable[Record]) -> Record:
    return min(records, key=lambda r: r.ordinal)


def eval_hash(key: str, seed: int) -> int:
  """A seeded 64-bit hash of a key: the held-out draw (independent of order and of other keys)."""
  return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "big")


@dataclasses.dataclass(frozen=True)
class EvalDraw:
  """Which usable, de-duplicated record goes to 'validation' when no source names the split.

  A record is held out when its `eval_hash` is below eval_fraction * 2^64: about eval_fraction
  of the images (binomially), the same on any machine or runner. `min_hash` (the smallest hash
  over all kept records) is held out too, so a small collection holds out at least one image,
  as the folder source does. eval_fraction == 0 holds out nothing.
  """

  eval_fraction: float
  seed: int
  min_hash: int | None = None

  def split_of(self, record: Record) -> str:
    if record.split:
      return record.split
    if self.eval_fraction <= 0:
      return TRAIN
    h = eval_hash(record.key, self.seed)
    return VALIDATION if h < int(self.eval_fraction * 2**64) or h == self.min_hash else TRAIN


def example(record: Record) -> tuple[str, dict[str, object]]:
  """(TFDS key, features) of a kept record (see `packed_dataset.features`)."""
  return record.key, {"image": record.image, "key": record.key, "height": record.height,
                      "width": record.width, "caption": record.caption}

