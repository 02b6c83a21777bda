"""transforms: decoding every awkward-but-valid kind of file, refusing unusable ones, the views."""

import numpy as np
import pytest
from PIL import Image

from conftest import MAX_PIXELS
from conftest import bad_image_files
from conftest import encode_image
from conftest import good_image_files
from conftest import random_photo
from vae_scale.data import transforms


def _close(a, b, tol=6):
  return np.all(np.abs(np.asarray(a, int) - np.asarray(b, int)) <= tol)


# What each of `good_image_files()` must decode to (the rest: any RGB image).
_GOOD_CHECKS = {
    "gray.jpg": lambda a: np.array_equal(a[..., 0], a[..., 2]),
    "cmyk.jpg": lambda a: _close(a[10, 10], (255, 0, 0)),
    "palette.png": lambda a: _close(a[0, 0], (255, 0, 0), 0) and _close(a[0, 20], (0, 255, 0), 0),
    "palette_transparent.png": lambda a: (_close(a[0, 0], (255, 255, 255), 0) and
                                          _close(a[0, 20], (0, 255, 0), 0)),
    "rgba.png": lambda a: _close(a[0, 0], (255, 255, 255), 0) and _close(a[0, 20], (127, 127, 127),
                                                                         1),
    "gray_transparent.png": lambda a: (_close(a[0, 0], (255, 255, 255), 0) and
                                       _close(a[0, 20], (127, 127, 127), 0)),
    "la.png": lambda a: _close(a[0, 0], (255, 255, 255), 0) and _close(a[0, 20], (0, 0, 0), 0),
    "gray16.png": lambda a: (_close(a[0, 0], (255,) * 3, 0) and _close(a[0, 10], (128,) * 3, 0) and
                             _close(a[0, 20], (1,) * 3, 0)),
    "rgb16.png": lambda a: _close(a[0, 0], (255, 0, 128), 0),
    # Displayed 20 wide x 40 high, red on top (the stored left half, rotated clockwise).
    "exif_rotated.jpg": lambda a: (a.shape == (40, 20, 3) and _close(a[5, 10], (255, 0, 0), 12) and
                                   _close(a[35, 10], (0, 0, 255), 12)),
    "tiny.png": lambda a: a.shape == (4, 5, 3),
}


@pytest.mark.parametrize("name", sorted(good_image_files()))
def test_decode_handles_every_awkward_valid_kind(name):
  img = transforms.decode_image(good_image_files()[name], MAX_PIXELS)
  assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  assert _GOOD_CHECKS.get(name, lambda a: True)(img), img[0, ::8]
  out = transforms.eval_view(img, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.float32


@pytest.mark.parametrize("name", sorted(bad_image_files()))
def test_decode_refuses_every_unusable_kind(name):
  with pytest.raises(transforms.BadImageError):
    transforms.decode_image(bad_image_files()[name], MAX_PIXELS)


def test_decode_names_the_file_and_reads_reduced_jpegs(tmp_path):
  with pytest.raises(transforms.BadImageError, match="missing.jpg"):
    transforms.decode_image(str(tmp_path / "missing.jpg"))
  import skimage.data  # pylint: disable=g-import-not-at-top
  data = encode_image(Image.fromarray(skimage.data.astronaut()), "JPEG", quality=95)
  full = transforms.load_image(data)
  reduced = transforms.load_image(data, min_size=100)  # DCT-domain 1/4 decode: 128 x 128.
  assert full.size == (512, 512) and reduced.size == (128, 128)
  # The view from the reduced decode differs from the full decode's by less than the choice of
  # bilinear over bicubic would (1.6 vs 2.3 levels of 255 on average here).
  a = transforms.eval_view(full, 100)
  b = transforms.eval_view(reduced, 100)
  assert np.abs(a - b).mean() * 127.5 < 2.0


def test_views_resize_only_the_crop_and_match_resize_then_crop():
  img = np.asarray(random_photo(50, 37, seed=3))
  for size in (20, 37, 64):
    got = transforms.train_view(img, size, np.random.default_rng(4))
    g = np.random.default_rng(4)
    want = transforms.random_crop(transforms.resize_shorter_side(img, size), size, g)
    if g.random() < 0.5:
      want = want[:, ::-1]
    assert np.abs(got - transforms.to_signed_float(want)).max() <= 2.5 / 127.5
    center = transforms.center_crop(transforms.resize_shorter_side(img, size), size)
    assert np.abs(transforms.eval_view(img, size) -
                  transforms.to_signed_float(center)).max() <= 2.5 / 127.5


def test_train_view_matches_a_numpy_reference():
  rng_img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
  out = transforms.train_view(rng_img, 20, np.random.default_rng(5))
  # Shorter side already 20: no resize; reproduce crop and flip with the same generator.
  g = np.random.default_rng(5)
  top, left = int(g.integers(0, 1)), int(g.integers(0, 11))
  want = rng_img[top:top + 20, left:left + 20]
  if g.random() < 0.5:
    want = want[:, ::-1]
  np.testing.assert_allclose(out, want.astype(np.float32) / 127.5 - 1)
  small = transforms.eval_view(rng_img[:8, :12], 16)  # Smaller than the crop: upscaled.
  assert small.shape == (16, 16, 3)
