"""rFID and LPIPS in the one evaluation, against pytorch-fid and the lpips package (seeded weights)."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from pytorch_fid import fid_score

import feature_nets
from conftest import tiny_config
from vae_scale import evaluation
from vae_scale import fid
from vae_scale import models
from vae_scale import rfid
from vae_scale import sharding
from vae_scale.data import pipeline
from vae_scale.interop import torch_nets


def test_allgather_stats_is_bit_exact():
  rng = np.random.default_rng(0)
  stats = fid.FeatureStats(6).add(rng.normal(size=(9, 6)) * 1e3 + 1e-9)
  out = rfid.allgather_stats(stats)  # One process: the gather of itself.
  assert out.count == 9
  np.testing.assert_array_equal(out.total, stats.total)
  np.testing.assert_array_equal(out.outer, stats.outer)


def test_local_rows_are_this_process_rows_in_order():
  mesh = sharding.create_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  arr = jax.device_put(x, sharding.batch_sharding(mesh))
  assert len(arr.addressable_shards) == 8
  np.testing.assert_array_equal(rfid.local_rows(arr), x)


def test_padding_is_left_out_of_the_statistics():
  acc = rfid.RFID(dim=3)
  real = np.arange(12, dtype=np.float64).reshape(4, 3)
  acc.add(real, real + 1, np.array([1, 0, 1, 0], np.float32))
  assert acc.real.count == acc.fake.count == 2
  np.testing.assert_array_equal(acc.real.total, real[[0, 2]].sum(0))


def test_progress_logs_eta_and_the_table_line(caplog):
  progress = rfid.Progress(total_batches=4, every=2)
  with caplog.at_level(logging.INFO):
    for i in range(1, 5):
      progress.update(i, 8.0)
  lines = [r.getMessage() for r in caplog.records if "batches" in r.getMessage()]
  assert len(lines) == 2 and lines[0].startswith("Evaluation: 2/4 batches, 16 images, ")
  assert "images/s, ETA 0:00:0" in lines[0] and "4/4 batches, 32 images" in lines[1]
  result = {"rfid": 4.7, "psnr": 24.5, "psnr_std": 4.19, "ssim": 0.71, "ssim_std": 0.15,
            "lpips": None, "num_images": 5000}
  assert rfid.table_line(result) == ("rFID 4.700 | PSNR 24.50 ± 4.19 | SSIM 0.710 ± 0.150 | "
                                     "LPIPS - | 5000 images")


# --------------------------------------------------------------------------- the Evaluator


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
  evaluator = evaluation.Evaluator(
      config, mesh, kinds=("reconstructions",),
      lpips_params=torch_nets.load_lpips_params(nets["lpips"]),
      inception_params=torch_nets.load_inception_params(nets["inception"]), log_every_batches=1)
  result, _ = evaluator(jax.device_put(params, sharding.replicated(mesh)), ds, 1)
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
  assert "evaluate/rfid" in evaluation.scalars(result, "evaluate")
