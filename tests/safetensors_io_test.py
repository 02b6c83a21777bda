"""interop.safetensors_io: files written and read back as they were; pickles never unpickled."""

import json
import os
import pickle

import numpy as np
import pytest

from conftest import SMALL_DIFFUSERS
from conftest import small_autoencoder_config
from vae_scale.errors import ConversionError
from vae_scale.interop import safetensors_io
from vae_scale.run import weights

SMALL = small_autoencoder_config()


def test_write_then_read_gives_the_same_arrays(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {"a.weight": rng.standard_normal((3, 4, 1, 1)).astype(np.float32),
             "b.bias": rng.standard_normal((5,)).astype(np.float16)}
  path = str(tmp_path / "deep" / "t.safetensors")  # Missing parent folders are created.
  safetensors_io.write_safetensors(tensors, path, metadata={"format": "pt"})
  back = safetensors_io.read_safetensors(path)
  assert sorted(back) == sorted(tensors)
  for k, v in tensors.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
  with pytest.raises(ConversionError, match="is not a safetensors file"):
    safetensors_io.read_safetensors(str(tmp_path / "junk.safetensors"))


def test_scalars_keep_their_shape(tmp_path):
  path = str(tmp_path / "s.safetensors")
  safetensors_io.write_safetensors({"loss.logvar": np.asarray(2.5, np.float32)}, path)
  assert safetensors_io.read_safetensors(path)["loss.logvar"].shape == ()


class _Payload:
  """Unpickling this would create a file: proof that nothing was unpickled."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path):
  sentinel = str(tmp_path / "unpickled")
  blob = pickle.dumps({"state_dict": _Payload(sentinel)})
  for name in ("sd-vae.ckpt", "model.bin", "disguised.safetensors"):
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(ConversionError, match="never unpickles.*safetensors"):
      weights.load_params(str(tmp_path / name), SMALL)
  folder = tmp_path / "old_diffusers"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(SMALL_DIFFUSERS))
  (folder / "diffusion_pytorch_model.bin").write_bytes(blob)
  with pytest.raises(ConversionError, match="save_pretrained.*safe_serialization"):
    weights.load_params(str(folder))
  assert not os.path.exists(sentinel)
