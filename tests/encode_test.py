"""encode: latents of a split written as shards with metadata, per process, read back in order."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from vae_scale.run import checkpoints
from vae_scale.tools import encode
from vae_scale import models
from vae_scale.data import transforms
from vae_scale.data import sources
from vae_scale.errors import ConfigError
from vae_scale.models import AutoencoderConfig


def _config():
  return tiny_config(num_train_steps=2, checkpoint_every_steps=2, ema_decay=0.9)


def _model(config, params):
  return nnx.merge(models.autoencoder_graphdef(AutoencoderConfig.from_config(config)), params)


def _random_params(model_cfg, seed):
  rng = np.random.default_rng(seed)  # Numpy: an eager nnx init takes seconds.
  return jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                      models.abstract_params(model_cfg))


@pytest.mark.slow
def test_encode_writes_shards_and_metadata_that_read_back(run_dir, tmp_path):
  config = _config()
  out = str(tmp_path / "latents")
  meta = encode.run(config, run_dir, out, images_per_shard=24)
  z, index, read_meta = encode.read_latents(out)
  assert read_meta == json.loads(json.dumps(meta))
  assert meta["count"] == 64 and meta["latent_shape"] == [8, 8, 4] and meta["mode"] == "mean"
  assert meta["weights"] == "ema" and meta["step"] == 2
  assert meta["shards"] == [f"latents-00000-0000{i}.npz" for i in range(3)]
  sizes = [len(np.load(os.path.join(out, s))["index"]) for s in meta["shards"]]
  assert sizes == [24, 24, 16]
  np.testing.assert_array_equal(index, np.arange(64))
  assert z.shape == (64, 8, 8, 4) and z.dtype == np.float32
  z64 = z.astype(np.float64)
  np.testing.assert_allclose(meta["scale_factor"], 1 / z64.std(), rtol=1e-6)
  np.testing.assert_allclose(meta["shift_factor"], z64.mean(), atol=1e-7)
  np.testing.assert_allclose(meta["latent_std_per_channel"], z64.std(axis=(0, 1, 2)), rtol=1e-6)

  # The latents are the posterior means of the center crops, in source order.
  params, _, _ = checkpoints.read_params(run_dir, AutoencoderConfig.from_config(config))
  model = _model(config, params)
  source = sources.make_source(config, "train")
  x = np.stack([transforms.eval_view(source[i], config.image_size) for i in range(64)])
  post = model.encode(x)
  np.testing.assert_allclose(z, np.asarray(post.mean), atol=5e-5)

  # Posterior samples stored as float16: (sample - mean) / std is standard normal.
  sampled = str(tmp_path / "sampled")
  meta_s = encode.run(config, run_dir, sampled, mode="sample", dtype="float16")
  zs, _, _ = encode.read_latents(sampled)
  assert meta_s["mode"] == "sample" and zs.dtype == np.float16 and meta_s["shards"] == [
      "latents-00000-00000.npz"]
  eps = (zs.astype(np.float64) - np.asarray(post.mean)) / np.asarray(post.std)
  assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05

  with pytest.raises(ConfigError, match="overwrite"):
    encode.run(config, run_dir, out)


@pytest.mark.slow
def test_each_process_encodes_and_writes_its_own_share(tmp_path):
  config = _config()
  model_cfg = AutoencoderConfig.from_config(config)
  params = _random_params(model_cfg, 3)
  out = str(tmp_path / "latents")
  shares = [encode.encode_share(config, params, model_cfg, out, process_index=p, process_count=2,
                                images_per_shard=20) for p in range(2)]
  assert [s.shards for s in shares] == [
      ["latents-00000-00000.npz", "latents-00000-00001.npz"],
      ["latents-00001-00000.npz", "latents-00001-00001.npz"]]
  for p in range(2):
    idx = np.concatenate([np.load(os.path.join(out, f))["index"] for f in shares[p].shards])
    np.testing.assert_array_equal(idx, np.arange(p, 64, 2))
  meta = encode.write_metadata(out, shares, latent_shape=[8, 8, 4])
  z, index, _ = encode.read_latents(out)
  np.testing.assert_array_equal(index, np.arange(64))
  assert meta["images_per_process"] == [32, 32]
  np.testing.assert_allclose(meta["scale_factor"], 1 / z.astype(np.float64).std(), rtol=1e-9)
  np.testing.assert_allclose(meta["shift_factor"], z.astype(np.float64).mean(), atol=1e-12)
