"""The one evaluation: rFID's statistics and LPIPS against pytorch-fid and the lpips package (seeded
weights), padding left out."""

import jax
import numpy as np
import pytest
from flax import nnx

import feature_nets
from conftest import tiny_config
from vae_scale import models
from vae_scale.data import pipeline
from vae_scale.eval import evaluator
from vae_scale.eval import fid
from vae_scale.eval import report
from vae_scale.models import frozen_weights
from vae_scale.training import sharding


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
  """Converted files and the torch reference modules of seeded LPIPS-VGG and Inception."""
  tmp = str(tmp_path_factory.mktemp("nets"))
  sd = feature_nets.inception_state_dict()
  lpips_net = feature_nets.torch_lpips()
  return {"inception": feature_nets.inception_files(sd, tmp)[0],
          "torch_inception": feature_nets.torch_inception(sd),
          "lpips": feature_nets.lpips_files(lpips_net, tmp)[0], "torch_lpips": lpips_net}


def _pool3(net, images: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():  # pytorch-fid takes [0, 1].
    return net(feature_nets.nchw((images + 1) / 2))[0].numpy().reshape(len(images), -1)


@pytest.mark.slow
def test_evaluator_rfid_statistics_and_lpips_match_pytorch_fid_and_lpips(nets, monkeypatch):
  """The held-out images' and reconstructions' Inception statistics equal those of pytorch-fid's
  InceptionV3 on the same images (padding left out), handed to the Frechet distance in that order;
  the distance itself equals pytorch-fid's in fid_test (each 2048-d one costs two ~40 s sqrtm's on
  2 cores, so it is not computed again here)."""
  handed = []

  def distance(real, fake, *unused):
    handed.append((real, fake))
    return 4.25

  monkeypatch.setattr(fid, "fid_from_stats", distance)
  # 12 held-out images in global batches of 8: the second batch has 4 weight-0 padding images.
  config = tiny_config(num_eval_images=12)
  model_cfg = models.AutoencoderConfig.from_config(config)
  model = models.AutoencoderKL(model_cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mesh = sharding.create_mesh()
  ds = pipeline.create_eval_dataset(config, 0, 1)
  scorer = evaluator.Evaluator(
      config, mesh, kinds=("reconstructions",),
      lpips_params=frozen_weights.load_lpips_params(nets["lpips"]),
      inception_params=frozen_weights.load_inception_params(nets["inception"]), log_every_batches=1)
  result, _ = scorer(jax.device_put(params, sharding.replicated(mesh)), ds, 1)
  assert result["num_images"] == 12 and result["rfid"] == 4.25

  x = np.stack([ds[i]["image"] for i in range(12)])
  recon = np.clip(np.asarray(model.decode(model.encode(x).mean)), -1, 1)
  real, fake = _pool3(nets["torch_inception"], x), _pool3(nets["torch_inception"], recon)
  ((got_real, got_fake),) = handed
  for got, want in ((got_real, real), (got_fake, fake)):
    assert got.count == 12  # The four padding images never entered.
    want = want.astype(np.float64)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got.mean(), want.mean(0), atol=2e-5 * scale)
    np.testing.assert_allclose(got.cov(), np.cov(want, rowvar=False), atol=2e-5 * scale ** 2)
  # The statistics differ: a distance between them is not trivially 0.
  assert np.abs(got_real.mean() - got_fake.mean()).max() > 1e-3 * np.abs(real).max()

  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    d = nets["torch_lpips"](feature_nets.nchw(recon), feature_nets.nchw(x)).numpy().reshape(-1)
  np.testing.assert_allclose(result["lpips"], d.mean(), rtol=1e-4)
  np.testing.assert_allclose(result["lpips_std"], d.std(), rtol=1e-3)
  assert "evaluate/rfid" in report.scalars(result, "evaluate")


# --------------------------------------------------------------------------- diffusability


def test_spectral_energy_of_hand_made_latents():
  """Waves of known frequency (cycles per latent pixel): 1/8 and (1/8, 1/8) lie below half the
  Nyquist frequency (0.25), 3/8 and (1/8, 1/4) (radius 0.28) above; a constant is no energy."""
  n = 8
  y, x = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  wave = lambda fy, fx: np.cos(2 * np.pi * (fy * y + fx * x))
  a, b = 1.5, 0.5
  z = np.stack([a * wave(0, 1 / 8) + b * wave(0, 3 / 8),  # Channel 0: energies a^2 and b^2.
                wave(1 / 8, 1 / 8) + 7.0,  # Channel 1: low, plus an offset (no energy).
                wave(1 / 4, 1 / 8)], axis=-1)[None]  # Channel 2: radius sqrt(5)/8 > 1/4.
  high, total = (float(v[0]) for v in evaluator.spectral_energy(z.astype(np.float32)))
  # A real wave of amplitude c has |FFT| = c n^2 / 2 at +f and at -f: energy c^2 n^4 / 2.
  e = lambda c: c ** 2 * n ** 4 / 2
  assert total == pytest.approx(e(a) + e(b) + e(1) + e(1), rel=1e-5)
  assert high == pytest.approx(e(b) + e(1), rel=1e-5)
  # Only the high wave: all of it; only low ones: none.
  h, t = evaluator.spectral_energy(wave(0, 3 / 8)[None, :, :, None].astype(np.float32))
  assert float(h[0]) == pytest.approx(float(t[0]), rel=1e-6)
  h, _ = evaluator.spectral_energy(wave(1 / 8, 0)[None, :, :, None].astype(np.float32))
  assert abs(float(h[0])) < 1e-6 * e(1)


def test_vf_cosine_is_the_mean_cosine_of_projected_latents_and_features():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  proj = rng.normal(size=(5, 7)).astype(np.float32)
  feats = rng.normal(size=(2, 3, 4, 7)).astype(np.float32)
  zp = z.astype(np.float64) @ proj
  cos = np.sum(zp * feats, -1) / (np.linalg.norm(zp, axis=-1) * np.linalg.norm(feats, axis=-1))
  np.testing.assert_allclose(np.asarray(evaluator.vf_cosine(proj, z, feats)), cos.mean((1, 2)),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(evaluator.vf_cosine(proj, z, z @ proj)), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_evaluator_reports_the_spectral_share_and_vf_cosine_of_the_real_images(tmp_path):
  from vae_scale.models import dinov2  # pylint: disable=g-import-not-at-top
  config = tiny_config(num_eval_images=12)  # 8 + 4 real and 4 padding images; 8x8x4 latents.
  model_cfg = models.AutoencoderConfig.from_config(config)
  model = models.AutoencoderKL(model_cfg, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mesh = sharding.create_mesh()
  ds = pipeline.create_eval_dataset(config, 0, 1)
  path = feature_nets.dinov2_file(tmp_path / "d.safetensors", 16)
  d_params, d_cfg = frozen_weights.load_dinov2_params(path)
  proj = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
  scorer = evaluator.Evaluator(config, mesh, kinds=("reconstructions",), dinov2=(d_params, d_cfg))
  result, _ = scorer(jax.device_put(params, sharding.replicated(mesh)), ds, 1, vf_proj=proj)

  x = np.stack([ds[i]["image"] for i in range(12)])
  z = np.asarray(model.encode(x).mean, np.float64)
  spectrum = np.abs(np.fft.fft2(z - z.mean((1, 2), keepdims=True), axes=(1, 2))) ** 2
  radius = np.hypot(*np.meshgrid(np.fft.fftfreq(8), np.fft.fftfreq(8), indexing="ij"))
  want = spectrum[:, radius > 0.25].sum() / spectrum.sum()
  assert 0.0 < want < 1.0
  assert result["latent_hf_share"] == pytest.approx(want, rel=1e-4)
  # The run's input to DINOv2 (loss.vf_pos_antialias True), on the 8x8 latent grid.
  cfg = d_cfg.__class__(**{**d_cfg.to_dict(), "pos_antialias": True})
  feats = np.asarray(dinov2.dinov2_features(d_params, cfg, dinov2.preprocess(x, (8, 8))).patches)
  zp = z @ proj
  cos = np.sum(zp * feats, -1) / (np.linalg.norm(zp, axis=-1) * np.linalg.norm(feats, axis=-1))
  assert result["vf_cosine"] == pytest.approx(cos.mean(), rel=1e-4, abs=1e-6)
  with pytest.raises(evaluator.ConfigError, match="width 3"):
    scorer(jax.device_put(params, sharding.replicated(mesh)), ds, 1, vf_proj=proj[:, :3])
  line = report.latent_line(result)
  assert "spectral energy above Nyquist/2" in line and "VF cosine" in line
  scalars = report.scalars(result, "eval")
  assert "eval/latent_hf_share" in scalars and "eval/latent_mean_channel_3" in scalars
