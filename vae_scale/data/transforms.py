"""Per-example image transforms for Grain: decode, resize, crop, flip, map to [-1, 1]. Numpy + PIL.

Decoding is where real-world folders bite: `load_image` turns anything PIL can open into an 8-bit
RGB image the same way every time (EXIF orientation applied, alpha composited on white, grayscale,
palette, CMYK and 16-bit converted) and raises `BadImageError` for everything else.

The views resize only the pixels they keep: the crop is chosen in the coordinates of the resized
image and `Image.resize(box=...)` resamples just that square from the source (the same result as
resizing the whole image and then cropping, to within one level of rounding, at a fraction of the
cost). JPEGs additionally decode at a reduced DCT scale when the image is much larger than needed.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image
from PIL import ImageOps

# PIL's own decompression-bomb limit (2 * Image.MAX_IMAGE_PIXELS) also applies; the default here
# equals it, so `data.max_pixels` decides for anything up to that.
DEFAULT_MAX_PIXELS = 178_956_970

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImageError(ValueError):
  """An image file that cannot be used (corrupt, empty, not an image, too large)."""


def _read(data: bytes | str | os.PathLike) -> tuple[str, io.IOBase]:
  """(name for messages, open binary file object) for bytes, a local path or a remote URL."""
  if isinstance(data, (bytes, bytearray, memoryview)):
    return "<bytes>", io.BytesIO(data)
  name = os.fspath(data)
  if "://" in name:  # gs://, s3://: etils resolves the filesystem (tf.io.gfile / fsspec).
    from etils import epath  # pylint: disable=g-import-not-at-top
    return name, io.BytesIO(epath.Path(name).read_bytes())
  return name, open(name, "rb")


def load_image(data: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_size: int | None = None) -> Image.Image:
  """Decodes an image file (path, URL or bytes) into an 8-bit RGB PIL image.

  Args:
    data: a path, a gs:// style URL, or the encoded bytes.
    max_pixels: width * height above which the file is refused before decoding (bomb guard).
    min_size: if given, a JPEG may be decoded at a reduced scale (1/2, 1/4, 1/8) as long as its
      shorter side stays >= min_size; the caller resizes to min_size afterwards anyway.
  Returns:
    A loaded 'RGB' image, EXIF orientation applied.
  Raises:
    BadImageError: the file is empty, corrupt, truncated, not an image, or over `max_pixels`.
  """
  name = "<bytes>"
  try:
    name, fp = _read(data)
    with fp:  # Not `with Image.open(...)`: closing the image would discard its pixels.
      img = Image.open(fp)
      w, h = img.size
      if w * h > max_pixels:
        raise BadImageError(f"{name}: {w}x{h} exceeds data.max_pixels={max_pixels}")
      if min_size and img.format == "JPEG" and min(w, h) >= 2 * min_size:
        scale = min_size / min(w, h)
        # draft picks the smallest DCT scale whose size is >= the requested one in both axes.
        img.draft(img.mode, (math.ceil(w * scale), math.ceil(h * scale)))
      img.load()
    ImageOps.exif_transpose(img, in_place=True)
    return _to_rgb(img)
  except BadImageError:
    raise
  except Image.UnidentifiedImageError as e:
    raise BadImageError(f"{name}: " + ("empty file" if _is_empty(data) else
                                       "not an image format PIL can read")) from e
  except Exception as e:  # pylint: disable=broad-except
    # Truncated or corrupt data, missing files, and whatever a broken file makes a decoder raise
    # (struct.error, IndexError, MemoryError, ...): none may stop a data worker.
    raise BadImageError(f"{name}: {type(e).__name__}: {e}") from e


def _is_empty(data: bytes | str | os.PathLike) -> bool:
  if isinstance(data, (bytes, bytearray, memoryview)):
    return len(data) == 0
  try:
    return "://" not in os.fspath(data) and os.path.getsize(data) == 0
  except OSError:
    return False


def decode_image(data: bytes | str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_size: int | None = None) -> np.ndarray:
  """Decodes an image file or its bytes into uint8 RGB [H, W, 3] (see `load_image`).

  Raises:
    BadImageError: the file is empty, corrupt, truncated, not an image, or over `max_pixels`.
  """
  return np.asarray(load_image(data, max_pixels, min_size))


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode as 8-bit RGB: 16/32-bit integer gray scaled from 0..65535, alpha over white."""
  if img.mode in _INT_MODES:
    # 16-bit PNGs ('I;16', or 'I' on older Pillow): full scale is 65535, whatever the content.
    arr = np.asarray(img).astype(np.int64)
    arr = ((np.clip(arr, 0, 65535) + 128) // 257).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB")
  if img.mode == "F":
    arr = np.clip(np.asarray(img, np.float32), 0, 255) + 0.5
    return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
  if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # tRNS: a transparent colour.
    img = img.convert("RGBA")
  if img.mode in _ALPHA_MODES:
    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, img)
  return img if img.mode == "RGB" else img.convert("RGB")


def as_rgb_array(image: np.ndarray) -> np.ndarray:
  """A decoded array ([H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; any int dtype) as uint8 RGB."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(image, 0, 255).astype(np.uint8)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    alpha = image[..., 3:].astype(np.float32) / 255.0
    image = (image[..., :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
  return image


def _resized_shape(w: int, h: int, size: int) -> tuple[int, int]:
  """(width, height) after scaling so the shorter side is `size`."""
  scale = size / min(h, w)
  return max(size, round(w * scale)), max(size, round(h * scale))


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes uint8 [H, W, 3] so min(H, W) == size (bicubic, antialiased; upscales small images)."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  return np.asarray(Image.fromarray(image).resize(_resized_shape(w, h, size),
                                                  Image.Resampling.BICUBIC, reducing_gap=None))


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  h, w = image.shape[:2]
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return image[top:top + size, left:left + size]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def to_signed_float(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1], into `out` (float32, same shape) if given."""
  out = np.divide(image, 127.5, out=out, dtype=np.float32)
  np.subtract(out, 1.0, out=out)
  return out


def _crop_resized(image: Image.Image | np.ndarray, size: int, top: int, left: int) -> np.ndarray:
  """The [size, size] window at (top, left) of `image` resized to shorter side `size`, uint8."""
  if isinstance(image, np.ndarray):
    h, w = image.shape[:2]
    if min(h, w) == size:
      return image[top:top + size, left:left + size]
    image = Image.fromarray(image)
  w, h = image.size
  if min(h, w) == size:
    return np.asarray(image.crop((left, top, left + size, top + size)))
  rw, rh = _resized_shape(w, h, size)
  sx, sy = w / rw, h / rh
  box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
  return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box,
                                 reducing_gap=None))


def _size_of(image: Image.Image | np.ndarray) -> tuple[int, int]:
  return image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])


def _as_input(image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
  """A PIL image in RGB mode, or a uint8 RGB array."""
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else _to_rgb(image)
  return as_rgb_array(image)


def train_crop(image: Image.Image | np.ndarray, size: int,
               rng: np.random.Generator) -> np.ndarray:
  """`train_view` before the conversion to float: uint8 [size, size, 3] (may be a strided view)."""
  image = _as_input(image)
  w, h = _size_of(image)
  rw, rh = _resized_shape(w, h, size) if min(w, h) != size else (w, h)
  top = int(rng.integers(0, rh - size + 1))
  left = int(rng.integers(0, rw - size + 1))
  crop = _crop_resized(image, size, top, left)
  return crop[:, ::-1] if rng.random() < 0.5 else crop


def train_view(image: Image.Image | np.ndarray, size: int,
               rng: np.random.Generator) -> np.ndarray:
  """LDM's train transform: shorter side to `size`, random crop, random horizontal flip, [-1, 1].

  Args:
    image: uint8 [H, W, C] array (see `as_rgb_array`) or a PIL image, any size (small ones upscale).
    size: output side in pixels.
    rng: draws top, left, then the flip (the same draws as `random_crop` on the resized image).
  Returns:
    float32 [size, size, 3] in [-1, 1].
  """
  return to_signed_float(train_crop(image, size, rng))


def eval_crop(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
  """`eval_view` before the conversion to float: uint8 [size, size, 3]."""
  image = _as_input(image)
  w, h = _size_of(image)
  rw, rh = _resized_shape(w, h, size) if min(w, h) != size else (w, h)
  return _crop_resized(image, size, (rh - size) // 2, (rw - size) // 2)


def eval_view(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
  """Eval transform: shorter side to `size`, center crop, float32 [size, size, 3] in [-1, 1]."""
  return to_signed_float(eval_crop(image, size))
