"""Random-access image sources: folders, TFDS, scikit-image's photographs, procedural images.

Each source has `__len__`, `__getitem__` and a stable `repr()` (Grain compares it when restoring an
iterator). Elements are paths (decoded later, so a bad file can be skipped) or uint8 arrays HxWx3.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Sequence

import ml_collections
import numpy as np
from absl import logging

from vae_scale.data import transforms
from vae_scale.data import file_lists
from vae_scale.errors import ConfigError
from vae_scale.errors import DataError

# scikit-image's bundled photographs (no download; the grey ones become grey RGB). The evaluation
# holds out three whole photographs: two colour scenes and the grey cameraman.
SAMPLE_TRAIN_PHOTOS = ("astronaut", "coffee", "chelsea", "hubble_deep_field",
                       "immunohistochemistry", "retina", "coins", "moon", "brick", "grass",
                       "gravel")
SAMPLE_EVAL_PHOTOS = ("rocket", "motorcycle", "camera")


class SyntheticSource:
  """Procedural images (gradients, rectangles, discs), deterministic in (seed, index): uint8 HxWx3."""

  def __init__(self, size: int, image_size: int, seed: int):
    self._size, self._image_size, self._seed = size, image_size, seed

  def __len__(self) -> int:
    return self._size

  def __repr__(self) -> str:
    return f"SyntheticSource(size={self._size}, image_size={self._image_size}, seed={self._seed})"

  def __getitem__(self, index: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, int(index)])
    s = self._image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) % 1.0
    img = c0 + (c1 - c0) * t[..., None]
    for _ in range(int(rng.integers(1, 5))):
      color = rng.uniform(0, 255, 3)
      x0, y0 = rng.uniform(0, 1, 2)
      r = rng.uniform(0.1, 0.4)
      if rng.random() < 0.5:
        mask = (np.abs(xx - x0) < r) & (np.abs(yy - y0) < r * rng.uniform(0.3, 1))
      else:
        mask = (xx - x0) ** 2 + (yy - y0) ** 2 < r * r
      img[mask] = color
    return img.astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _sample_photo(name: str) -> np.ndarray:
  """One of scikit-image's bundled photographs as uint8 RGB [H, W, 3] (read once per process)."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  if name == "motorcycle":  # The left view of the stereo pair.
    photo = transforms.as_rgb_array(skimage.data.stereo_motorcycle()[0])
  else:
    photo = transforms.as_rgb_array(getattr(skimage.data, name)())
  photo.setflags(write=False)  # Shared by every crop taken from it.
  return photo


class SamplesSource:
  """Random square crops (random scale and position) of scikit-image's bundled photographs."""

  def __init__(self, photos: tuple[str, ...], size: int, seed: int, min_crop: int):
    self._photos, self._size, self._seed, self._min_crop = tuple(photos), size, seed, min_crop

  def __len__(self) -> int:
    return self._size

  def __repr__(self) -> str:
    return (f"SamplesSource(photos={self._photos}, size={self._size}, seed={self._seed}, "
            f"min_crop={self._min_crop})")

  def __getitem__(self, index: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, int(index)])
    photo = _sample_photo(self._photos[int(index) % len(self._photos)])
    h, w = photo.shape[:2]
    side = int(rng.integers(min(self._min_crop, h, w), min(h, w) + 1))
    return transforms.random_crop(photo, side, rng)


class FolderSource:
  """Image file paths; decoding happens in the map so a bad file can be skipped, not fatal.

  The paths are held as one newline-separated UTF-8 buffer plus offsets (the bytes of the paths,
  not ~100 bytes of Python object per path): Grain pickles the source into every worker process,
  and folders hold millions of files.
  """

  def __init__(self, paths: Sequence[str], name: str):
    self._blob = "\n".join(paths).encode()
    ends = np.flatnonzero(np.frombuffer(self._blob, np.uint8) == ord("\n"))
    if len(ends) != max(len(paths) - 1, 0):
      raise ValueError("paths must not contain newlines")
    # Path i is blob[offsets[i]:offsets[i + 1] - 1] (the -1 drops the separator).
    self._offsets = np.concatenate([[0], ends + 1, [len(self._blob) + 1]]).astype(np.int64) if (
        paths) else np.zeros(1, np.int64)
    self._name = name
    self._digest = hashlib.sha1(self._blob).hexdigest()[:16]

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __repr__(self) -> str:
    return f"FolderSource(name={self._name!r}, n={len(self)}, sha1={self._digest})"

  def __getitem__(self, index: int) -> str:
    i = int(index)
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} paths")
    i %= len(self)
    return self._blob[self._offsets[i]:self._offsets[i + 1] - 1].decode()


class TfdsSource:
  """An image feature of a prepared TFDS dataset through `tfds.data_source` (ArrayRecord).

  An `Image` feature is read undecoded, as its file's bytes, and decoded by the pipeline as a
  folder's files are (`transforms.load_image`: EXIF orientation, every colour mode, reduced-scale
  JPEG decoding, unreadable ones skipped and counted); other features come as TFDS decodes them.
  """

  def __init__(self, name: str, split: str, data_dir: str, image_key: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._desc = (name, split, data_dir, image_key)
    name, data_dir = tfds_location(name, data_dir)
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # TFDS raises several types for "not prepared"; all mean the same here.
      first_line = str(e).splitlines()[0] if str(e) else ""
      if "split" in first_line.lower() and "unknown" in first_line.lower():
        raise DataError(f"config.data.tfds_name={name!r} has no split {split!r} ({first_line}); "
                        "set config.data.train_split / eval_split to one it has") from e
      where = f" --data_dir={data_dir}" if data_dir else ""
      raise DataError(
          f"config.data.tfds_name={name!r} split {split!r} is not prepared in "
          f"{data_dir or 'the default TFDS data_dir'} ({type(e).__name__}: {first_line}); "
          f"prepare it first: `tfds build {name} --file_format=array_record{where}`, or pack "
          f"your own images with `python -m vae_scale.prepare --src=... --out=DATA_DIR "
          f"--name={name}`") from e
    self._image_key = _tfds_image_key(self._source, name, image_key, tfds)
    features = getattr(getattr(self._source, "dataset_info", None), "features", None)
    if features is not None and isinstance(features[self._image_key], tfds.features.Image):
      # Undecoded: bytes go to the pipeline's decoder (see the class docstring).
      self._source = tfds.data_source(
          name, split=split, data_dir=data_dir or None, download=False,
          decoders={self._image_key: tfds.decode.SkipDecoding()})

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return "TfdsSource(name={!r}, split={!r}, data_dir={!r}, image_key={!r})".format(*self._desc)

  def __getitem__(self, index: int) -> bytes | np.ndarray:
    return self._source[int(index)][self._image_key]


def tfds_location(tfds_name: str, tfds_data_dir: str) -> tuple[str, str]:
  """(name, data_dir) of config.data.tfds_name / tfds_data_dir.

  A tfds_name that is a path (it contains '://' or starts with '/', '.' or '~'), such as
  'gs://bucket/tfds/laion_512' as `vae_scale.prepare --out=gs://bucket/tfds --name=laion_512`
  wrote it, names the dataset and its data_dir in one field. Otherwise both are TFDS's own
  ('imagenet2012', 'coco/2017:1.1.0').

  Raises:
    ConfigError: a path in tfds_name and a tfds_data_dir as well.
  """
  if not ("://" in tfds_name or tfds_name.startswith(("/", ".", "~"))):
    return tfds_name, tfds_data_dir
  if tfds_data_dir:
    raise ConfigError(f"config.data.tfds_name={tfds_name!r} is a path (DATA_DIR/NAME) and "
                      f"config.data.tfds_data_dir={tfds_data_dir!r} is set too; give one: "
                      "tfds_name=DATA_DIR/NAME alone, or tfds_name=NAME with tfds_data_dir")
  path = tfds_name.rstrip("/")
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
  data_dir, _, name = path.rpartition("/")
  return name, data_dir


def _tfds_image_key(source, name: str, image_key: str, tfds) -> str:
  """`image_key` if the dataset has it; else its only Image feature; else a DataError."""
  info = getattr(source, "dataset_info", None)
  features = getattr(info, "features", None)
  if features is None or image_key in features:
    return image_key
  images = [k for k, v in features.items() if isinstance(v, tfds.features.Image)]
  if len(images) == 1:
    logging.info("TFDS %s has no feature %r; using its image feature %r", name, image_key,
                 images[0])
    return images[0]
  raise DataError(f"config.data.image_key={image_key!r} is not a feature of TFDS {name!r} "
                  f"(features: {sorted(features)}; image features: {images}); set it to one "
                  "of its image features")


def make_source(config: ml_collections.ConfigDict, split: str, workdir: str | None = None):
  """The random-access source of `config.data` for split 'train' or 'eval'.

  Args:
    config: the run config (reads `config.data`, `seed`, `image_size`).
    split: 'train' or 'eval'.
    workdir: where folder listings are cached (`file_lists.list_image_files`); None: no cache.
  Raises:
    DataError: the path, folder or dataset can't be used (one line naming it).
  """
  d, train = config.data, split == "train"
  if d.source == "synthetic":
    return SyntheticSource(d.synthetic_size, config.image_size, config.seed + (0 if train else 1))
  if d.source == "samples":
    photos = SAMPLE_TRAIN_PHOTOS if train else SAMPLE_EVAL_PHOTOS
    return SamplesSource(photos, d.synthetic_size, config.seed + (0 if train else 1),
                         min_crop=config.image_size)
  if d.source == "tfds":
    return TfdsSource(d.tfds_name, d.train_split if train else d.eval_split, d.tfds_data_dir,
                      d.image_key)
  if d.source == "folder":
    if d.eval_path:
      path = d.path if train else d.eval_path
      return FolderSource(file_lists.list_image_files(path, cache_dir=workdir), path)
    train_files, eval_files = file_lists.split_files(
        file_lists.list_image_files(d.path, cache_dir=workdir), d.eval_fraction, config.seed)
    return FolderSource(train_files if train else eval_files, f"{d.path}:{split}")
  raise DataError(f"config.data.source={d.source!r} is unknown")
