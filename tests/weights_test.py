"""interop.weights: diffusers / LDM safetensors and params dirs <-> vae_scale params, exact round
trips, one clear error for mismatches, and the same outputs as diffusers itself."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import SMALL_DIFFUSERS
from conftest import assert_trees_equal
from conftest import random_params
from conftest import small_autoencoder_config
from vae_scale.tools import convert
from vae_scale import models
from vae_scale.errors import ConversionError
from vae_scale.interop import diffusers_config
from vae_scale.interop import names
from vae_scale.interop import safetensors_io
from vae_scale.run import weights
from vae_scale.models import AutoencoderConfig

# SMALL_DIFFUSERS's shape in vae_scale terms, plus self-attention at the 16 px level (both halves).
SMALL = small_autoencoder_config()
SMALL_ATTN = small_autoencoder_config(attn_resolutions=(16,))


def _photo(size: int) -> np.ndarray:
  """scikit-image's astronaut, resized: [1, size, size, 3] float32 in [-1, 1]."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.Resampling.BICUBIC)
  return (np.asarray(img, np.float32) / 127.5 - 1.0)[None]


def _vae_scale_outputs(model_cfg, params, x):
  model = nnx.merge(models.autoencoder_graphdef(model_cfg), params)
  post = model.encode(x)
  return np.asarray(post.mean), np.asarray(post.logvar), np.asarray(model.decode(post.mean))


def _diffusers_outputs(vae, x):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).latent_dist
    dec = vae.decode(dist.mean).sample
  nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  return nhwc(dist.mean), nhwc(dist.logvar), nhwc(dec)


def _random_diffusers_vae(**kwargs):
  """A randomly initialized diffusers AutoencoderKL whose norms are randomized too (so a swapped
  norm1/norm2 would show)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(**{**SMALL_DIFFUSERS, **kwargs}).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if "norm" in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
  return vae


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("model_cfg", [SMALL, SMALL_ATTN], ids=["mid_attn", "level_attn"])
def test_import_then_export_round_trips_every_tensor_exactly(tmp_path, model_cfg):
  params = random_params(model_cfg)
  # diffusers folder -> params -> diffusers folder: every tensor bit-identical.
  safetensors_io.export_diffusers(params, model_cfg, str(tmp_path / "a"), scaling_factor=0.2)
  first = safetensors_io.read_safetensors(str(tmp_path / "a" / safetensors_io.DIFFUSERS_WEIGHTS))
  loaded = weights.load_params(str(tmp_path / "a"))  # Architecture from config.json.
  assert_trees_equal(loaded, params)
  safetensors_io.export_diffusers(loaded, model_cfg, str(tmp_path / "b"))
  second = safetensors_io.read_safetensors(str(tmp_path / "b" / safetensors_io.DIFFUSERS_WEIGHTS))
  assert sorted(first) == sorted(second) and len(first) == len(jax.tree.leaves(params))
  for k in first:
    assert first[k].dtype == second[k].dtype == np.float32
    np.testing.assert_array_equal(first[k], second[k], err_msg=k)

  # LDM file -> params dir (Orbax) -> params -> LDM file.
  safetensors_io.export_ldm(params, str(tmp_path / "vae.safetensors"))
  ldm = safetensors_io.read_safetensors(str(tmp_path / "vae.safetensors"))
  assert ldm["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)  # 1x1 convs, as in SD.
  cfg = convert.run_import(str(tmp_path / "vae.safetensors"), str(tmp_path / "p"),
                           norm_groups=4, resolution=32)
  assert cfg == model_cfg  # The architecture is read off the names and shapes.
  from_dir = weights.load_params(str(tmp_path / "p"), model_cfg)
  assert_trees_equal(from_dir, params)
  safetensors_io.export_ldm(from_dir, str(tmp_path / "again.safetensors"))
  again = safetensors_io.read_safetensors(str(tmp_path / "again.safetensors"))
  assert sorted(ldm) == sorted(again)
  for k in ldm:
    np.testing.assert_array_equal(ldm[k], again[k], err_msg=k)


# --------------------------------------------------------------------------- against diffusers


def test_converted_diffusers_model_gives_the_same_outputs_on_a_photograph(tmp_path):
  vae = _random_diffusers_vae()
  vae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
  config_json = json.loads((tmp_path / "vae" / "config.json").read_text())
  model_cfg = diffusers_config.autoencoder_config_from_diffusers(config_json)
  assert model_cfg == SMALL
  params = weights.load_params(str(tmp_path / "vae"), model_cfg)
  x = _photo(32)
  ours = _vae_scale_outputs(model_cfg, params, x)
  theirs = _diffusers_outputs(vae, x)
  assert ours[0].shape == (1, 16, 16, 4) and ours[2].shape == (1, 32, 32, 3)
  for name, a, b in zip(("mean", "logvar", "decoded"), ours, theirs):
    assert np.std(b) > 1e-2, name  # Not a degenerate comparison.
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=name)


def test_exported_model_loads_in_diffusers_with_the_same_outputs(tmp_path):
  diffusers = pytest.importorskip("diffusers")
  pytest.importorskip("torch")
  params = random_params(SMALL_ATTN, seed=1)
  params = jax.tree.map(lambda a: a * 0.5, params)  # Keep activations moderate.
  safetensors_io.export_diffusers(params, SMALL_ATTN, str(tmp_path / "out"), scaling_factor=0.25,
                                  shift_factor=0.1)
  vae, info = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "out"),
                                                      output_loading_info=True)
  assert not any(info.values()), info  # No missing, unexpected or mismatched tensors.
  assert vae.config.scaling_factor == 0.25 and vae.config.shift_factor == 0.1
  assert list(vae.config.down_block_types) == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
  x = _photo(32)
  ours = _vae_scale_outputs(SMALL_ATTN, params, x)
  theirs = _diffusers_outputs(vae.eval(), x)
  for name, a, b in zip(("mean", "logvar", "decoded"), ours, theirs):
    assert np.std(b) > 1e-2, name
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=name)


# --------------------------------------------------------------------------- bad input


def test_mismatched_names_or_shapes_give_one_error_listing_the_first(tmp_path):
  params = random_params(SMALL)
  safetensors_io.export_diffusers(params, SMALL, str(tmp_path / "vae"))
  wider = AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4, resolution=32)
  with pytest.raises(ConversionError) as e:
    weights.load_params(str(tmp_path / "vae"), wider)
  msg = str(e.value)
  assert "don't match the model config" in msg and "ch=16" in msg
  assert "shape      encoder.conv_in.weight: file has [8, 3, 3, 3], the config expects " \
         "[16, 3, 3, 3]" in msg
  listed = [line for line in msg.splitlines() if line.startswith("  ")]
  assert len(listed) == 11 and listed[-1] == "  ... and 108 more"  # The first 10, then a count.
  assert "These weights look like: --config.image_size=32" in msg and "model.ch=8 " in msg

  sd = names.to_ldm_state_dict(params)
  sd["encoder.down.0.block.0.conv_typo.weight"] = sd.pop("encoder.down.0.block.0.conv1.weight")
  safetensors_io.write_safetensors(sd, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ConversionError) as e:
    weights.load_params(str(tmp_path / "bad.safetensors"), SMALL)
  msg = str(e.value)
  assert "2 tensor(s) don't match" in msg
  assert "missing    encoder.down_blocks.0.resnets.0.conv1.weight" in msg
  assert "unexpected encoder.down_blocks.0.resnets.0.conv_typo.weight (file: " \
         "encoder.down.0.block.0.conv_typo.weight)" in msg
