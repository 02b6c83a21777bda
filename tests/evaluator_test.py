"""The one evaluation: rFID and LPIPS against pytorch-fid and the lpips package (seeded weights),
padding left out."""

import jax
import numpy as np
import pytest
from flax import nnx
from pytorch_fid import fid_score

import feature_nets
from conftest import tiny_config
from vae_scale import models
from vae_scale.data import pipeline
from vae_scale.eval import evaluator
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


def _fid(f1: np.ndarray, f2: np.ndarray) -> float:
  f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
  return float(fid_score.calculate_frechet_distance(
      f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # pytorch-fid's sqrtm call.
def test_evaluator_rfid_and_lpips_match_pytorch_fid_and_lpips(nets):
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
  assert result["num_images"] == 12

  x = np.stack([ds[i]["image"] for i in range(12)])
  recon = np.clip(np.asarray(model.decode(model.encode(x).mean)), -1, 1)
  real, fake = _pool3(nets["torch_inception"], x), _pool3(nets["torch_inception"], recon)
  want = _fid(real, fake)
  assert want > 1.0
  np.testing.assert_allclose(result["rfid"], want, rtol=1e-3)
  # The four padding images (zeros, and their reconstructions) would have changed it: their mean
  # term ||mu_real - mu_fake||^2 alone moves by more than the tolerance (the whole Frechet distance
  # again would cost two more 2048x2048 sqrtm's).
  pad = np.zeros((4,) + x.shape[1:], np.float32)
  pad_recon = np.clip(np.asarray(model.decode(model.encode(pad).mean)), -1, 1)
  mean_term = lambda a, b: float(np.sum((a.mean(0) - b.mean(0)) ** 2, dtype=np.float64))
  padded = mean_term(np.concatenate([real, _pool3(nets["torch_inception"], pad)]),
                     np.concatenate([fake, _pool3(nets["torch_inception"], pad_recon)]))
  assert abs(padded - mean_term(real, fake)) > 0.01 * want

  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    d = nets["torch_lpips"](feature_nets.nchw(recon), feature_nets.nchw(x)).numpy().reshape(-1)
  np.testing.assert_allclose(result["lpips"], d.mean(), rtol=1e-4)
  np.testing.assert_allclose(result["lpips_std"], d.std(), rtol=1e-3)
  assert "evaluate/rfid" in report.scalars(result, "evaluate")
