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
