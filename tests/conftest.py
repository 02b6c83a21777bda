"""Test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

# XLA:CPU's LLVM backend at optimisation level 0: the suite's tiny programs compile ~1.5x faster
# (compiling is most of the suite's time; running them is not), and the HLO passes, hence the
# arithmetic, are the same (XLA:CPU does not use fast-math either way). Every process the tests start
# gets the same flags (`cpu_env`), so runs compared bit for bit are compiled alike.
COMPILE_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count=8 {COMPILE_FLAGS}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent compilation cache for the session, inherited by every process the tests start: the
# many runs of the same tiny configs (resumes, preemption phases, several processes) compile each
# program once. Cached executables are XLA's own output for the same program, bit for bit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vae_scale_test_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# torchvision (imported by the lpips and pytorch-fid references) crashes the process when it is
# imported after TensorFlow (which CLU and TFDS import): tensorflow-cpu 2.21 with torchvision 0.29.1.
# Importing it first, once, for the whole session avoids that.
try:
  import torchvision  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass

import pathlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parent.parent


def cpu_env(devices: int = 8, **extra: str) -> dict[str, str]:
  """The environment of a JAX process a test starts: `devices` CPU devices, the suite's flags."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}",
              **extra)
CONFIGS = REPO / "configs"


def load_config(name: str, arg: str | None = None):
  """Loads configs/<name>.py (or tests/<name>.py) the way --config does: get_config(arg)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = CONFIGS / f"{name}.py"
  path = path if path.exists() else REPO / "tests" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


@pytest.fixture(autouse=True, scope="session")
def _absl_flags_parsed():
  # Grain and CLU read absl flags; outside app.run they must be marked parsed.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  yield


def with_overrides(config, sep: str = ".", **overrides):
  """`config` with fields set by name (parent and child joined by `sep`); returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(sep)
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_config(**overrides):
  """tests/tiny_config.py (a few channels, 16 px) with dotted-name overrides."""
  return with_overrides(load_config("tiny_config"), **overrides)


def take(it, n):
  """The next `n` elements of an iterator."""
  return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------- image files
# What folders contain: every awkward-but-valid kind and every unusable kind of file, shared by the
# decode tests (transforms), the skip counting (skipping) and the eval set (pipeline).

MAX_PIXELS = 10_000  # `bad_image_files()['huge.png']` exceeds only this.


def encode_image(img, fmt, **kw) -> bytes:
  """A PIL image encoded as `fmt` ('JPEG', 'PNG', ...)."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def random_photo(w=48, h=36, seed=0):
  """A smooth random RGB PIL image (a low-resolution noise field upscaled bilinearly)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 255, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
  return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def _png_16bit_rgb(rgb16) -> bytes:
  """A 16-bit-per-channel RGB PNG (Pillow cannot write one), [H, W, 3] uint16."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top
  h, w, _ = rgb16.shape
  raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
  chunk = lambda t, d: (struct.pack(">I", len(d)) + t + d +
                        struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) +
          chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _exif_rotated_jpeg() -> bytes:
  """Stored 40 wide x 20 high, left half red; EXIF orientation 6 = display rotated 90 deg CW."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  arr = np.zeros((20, 40, 3), np.uint8)
  arr[:, :20] = (255, 0, 0)
  arr[:, 20:] = (0, 0, 255)
  img = Image.fromarray(arr)
  exif = img.getexif()
  exif[0x0112] = 6
  return encode_image(img, "JPEG", quality=95, exif=exif.tobytes())


def good_image_files() -> dict[str, bytes]:
  """name -> bytes for every awkward-but-valid kind (transforms_test checks what they decode to)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  palette = Image.new("P", (24, 20), 0)
  palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
  palette.paste(1, (12, 0, 24, 20))
  rgba = np.zeros((20, 24, 4), np.uint8)
  rgba[:, 12:] = (0, 0, 0, 128)  # Left half fully transparent, right half half-opaque black.
  la = np.zeros((20, 24, 2), np.uint8)
  la[:, 12:] = (0, 255)
  gray16 = np.full((20, 24), 65535, np.uint16)
  gray16[:, 8:16], gray16[:, 16:] = 32896, 200  # 200/65535 is nearly black, not 200/255.
  rgb16 = np.zeros((20, 24, 3), np.uint16)
  rgb16[...] = (65535, 0, 32896)
  photo = random_photo
  return {
      "rgb.jpg": encode_image(photo(), "JPEG"),
      "rgb.webp": encode_image(photo(seed=1), "WEBP"),
      "gray.jpg": encode_image(photo().convert("L"), "JPEG"),
      "cmyk.jpg": encode_image(Image.new("CMYK", (24, 20), (0, 255, 255, 0)), "JPEG", quality=95),
      "palette.png": encode_image(palette, "PNG"),
      "palette_transparent.png": encode_image(palette, "PNG", transparency=0),
      "rgba.png": encode_image(Image.fromarray(rgba, "RGBA"), "PNG"),
      "la.png": encode_image(Image.fromarray(la, "LA"), "PNG"),
      "gray_transparent.png": encode_image(Image.fromarray(la[..., 1] // 2), "PNG", transparency=0),
      "gray16.png": encode_image(Image.fromarray(gray16), "PNG"),
      "rgb16.png": _png_16bit_rgb(rgb16),
      "bilevel.png": encode_image(photo().convert("1"), "PNG"),
      "exif_rotated.jpg": _exif_rotated_jpeg(),
      "tiny.png": encode_image(photo(5, 4), "PNG"),  # Smaller than the 16 px crop: upscaled.
      "UPPER.JPEG": encode_image(photo(seed=2), "JPEG"),
  }


def bad_image_files() -> dict[str, bytes]:
  """name -> bytes for every kind of unusable file; `huge.png` only exceeds MAX_PIXELS."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  jpeg = encode_image(random_photo(64, 48), "JPEG")
  corrupt = bytearray(jpeg)
  corrupt[200:600] = b"\xff" * 400
  return {
      "truncated.jpg": jpeg[:len(jpeg) // 2],
      "corrupt.jpg": bytes(corrupt),
      "garbage_after_soi.jpg": jpeg[:2] + np.random.default_rng(1).bytes(2000),
      "empty.jpg": b"",
      "text.png": b"this is not an image\n",
      "page.jpg": b"<html><body>404 Not Found</body></html>",
      "huge.png": encode_image(Image.new("RGB", (200, 100), (9, 9, 9)), "PNG"),  # 20k pixels.
  }


def write_files(folder, files: dict[str, bytes]) -> None:
  """Writes name -> bytes into `folder` (created)."""
  os.makedirs(folder, exist_ok=True)
  for name, data in files.items():
    with open(os.path.join(folder, name), "wb") as f:
      f.write(data)


def folder_config(folder, **overrides):
  """tiny_config reading `folder` for train and eval, MAX_PIXELS, a global batch of 4."""
  return tiny_config(**{"data.source": "folder", "data.path": str(folder),
                        "data.eval_path": str(folder), "data.max_pixels": MAX_PIXELS,
                        "global_batch_size": 4, **overrides})


# --------------------------------------------------------------------------- small autoencoders
# Shared by the interop tests (names, safetensors_io, weights), optim and convert.

# A small diffusers AutoencoderKL: two levels, mid-block attention (diffusers' default).
SMALL_DIFFUSERS = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)


def small_autoencoder_config(**overrides):
  """SMALL_DIFFUSERS's shape as an AutoencoderConfig (e.g. attn_resolutions=(16,) adds
  self-attention at the 16 px level, both halves)."""
  from vae_scale.models import AutoencoderConfig  # pylint: disable=g-import-not-at-top
  return AutoencoderConfig(**{**dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                                     z_channels=4, resolution=32), **overrides})


def random_params(model_cfg, seed=0):
  """Random float32 numpy params of `model_cfg`'s autoencoder."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vae_scale import models  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(np.float32),
                      models.abstract_params(model_cfg))


def assert_trees_equal(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
  """A tiny 2-step run with EMA (checkpoint at step 2), shared by the evaluate and encode tests."""
  from vae_scale.run import loop  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("run")
  loop.train_and_evaluate(tiny_config(num_train_steps=2, checkpoint_every_steps=2,
                                       ema_decay=0.9), str(workdir))
  return str(workdir)
