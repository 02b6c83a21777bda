"""evaluate and encode on a tiny trained run; their outputs are read back and checked against the
model applied directly."""

import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from conftest import cpu_env
from conftest import REPO
from conftest import tiny_config
from vae_scale.run import checkpoints
from vae_scale import models
from vae_scale.tools import encode
from vae_scale.tools import evaluate
from vae_scale.data import pipeline
from vae_scale.errors import ConversionError
from vae_scale.interop import safetensors_io
from vae_scale.run import weights
from vae_scale.models import AutoencoderConfig

# tiny_config: 16 px, ch 4, ch_mult (1, 2) -> 8x8x4 latents; synthetic data, 64 train images.
TINY_CLI_FLAGS = ["--config.image_size=16", "--config.model.ch=4", "--config.model.ch_mult=(1,2)",
                  "--config.model.num_res_blocks=1", "--config.model.norm_groups=2",
                  "--config.data.source=synthetic", "--config.data.synthetic_size=24",
                  "--config.global_batch_size=8", "--config.num_eval_images=8"]


def _config():
  return tiny_config(num_train_steps=2, checkpoint_every_steps=2, ema_decay=0.9)


def _model(config, params):
  model_cfg = AutoencoderConfig.from_config(config)
  graphdef = models.autoencoder_graphdef(model_cfg)
  return nnx.merge(graphdef, params)


def _random_params(model_cfg, seed):
  rng = np.random.default_rng(seed)  # Numpy: an eager nnx init takes seconds.
  return jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32),
                      models.abstract_params(model_cfg))


def _png(path):
  return np.asarray(Image.open(io.BytesIO(open(path, "rb").read())))


@pytest.mark.slow
def test_evaluate_writes_json_tensorboard_and_grids_that_match_the_model(run_dir, tmp_path):
  config = _config()
  result = evaluate.run(config, run_dir, output_dir=str(tmp_path / "eval"))
  assert result["step"] == 2 and result["weights"] == "ema" and result["num_images"] == 8
  assert json.loads((tmp_path / "eval" / "eval_00000002.json").read_text()) == result

  # The same numbers, computed directly from the EMA weights on the same center crops.
  params, _, which = checkpoints.read_params(run_dir, AutoencoderConfig.from_config(config))
  assert which == "ema"
  ds = pipeline.create_eval_dataset(config, 0, 1)
  x = np.stack([ds[i]["image"] for i in range(8)])
  model = _model(config, params)
  post = model.encode(x)
  recon = np.asarray(model.decode(post.mean))
  mean, logvar = np.asarray(post.mean, np.float64), np.asarray(post.logvar, np.float64)
  unit = lambda a: np.clip((a + 1) / 2, 0, 1)
  mse = np.mean((unit(x) - unit(recon)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(result["psnr"], np.mean(10 * np.log10(1 / mse)), rtol=1e-4)
  np.testing.assert_allclose(result["l1"], np.mean(np.abs(x - recon)), rtol=1e-5)
  kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar)
  np.testing.assert_allclose(result["kl_per_channel"], kl.sum(axis=(1, 2)).mean(0), rtol=1e-4)
  np.testing.assert_allclose(result["latent_mean"], mean.mean(), atol=1e-6)
  np.testing.assert_allclose(result["latent_std"], mean.std(), rtol=1e-5)
  np.testing.assert_allclose(result["latent_std_per_channel"], mean.std(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(result["scale_factor"], 1 / mean.std(), rtol=1e-5)
  assert 0 < result["ssim"] <= 1 and result["psnr_std"] > 0

  # Grids: inputs over reconstructions; 8 prior samples; 4 pairs x (2 ends + 8 steps).
  assert _png(result["files"]["reconstructions"]).shape == (32, 128, 3)
  np.testing.assert_allclose(_png(result["files"]["reconstructions"])[16:, :16] / 127.5 - 1,
                             np.clip(recon[0], -1, 1), atol=1 / 127)
  assert _png(result["files"]["prior_samples"]).shape == (16, 128, 3)
  interp = _png(result["files"]["interpolations"])
  assert interp.shape == (64, 160, 3)
  np.testing.assert_allclose(interp[16:32, :16] / 127.5 - 1, x[2], atol=1 / 127)  # Pair 1's start.

  events = event_accumulator.EventAccumulator(str(tmp_path / "eval"),
                                              size_guidance={"tensors": 0})
  events.Reload()
  tags = set(events.Tags()["tensors"])
  assert {"evaluate/psnr", "evaluate/ssim", "evaluate/l1", "evaluate/kl_channel_3",
          "evaluate/latent_std", "evaluate/reconstructions", "evaluate/interpolations",
          "evaluate/prior_samples"} <= tags, tags
  psnr_event = events.Tensors("evaluate/psnr")[0]
  assert psnr_event.step == 2
  np.testing.assert_allclose(tensor_util.make_ndarray(psnr_event.tensor_proto), result["psnr"],
                             rtol=1e-6)

  # The same weights imported as a params directory evaluate the same.
  weights.save_params_dir(params, str(tmp_path / "params"), AutoencoderConfig.from_config(config))
  imported = evaluate.run(config, None, params_path=str(tmp_path / "params"),
                          output_dir=str(tmp_path / "eval_imported"))
  assert imported["weights"] == "imported" and imported["step"] == 0
  np.testing.assert_allclose(imported["l1"], result["l1"], rtol=1e-6)


@pytest.mark.slow
def test_command_lines_encode_and_evaluate_imported_weights(tmp_path):
  config = _config()
  model_cfg = AutoencoderConfig.from_config(config)
  params = _random_params(model_cfg, 4)
  safetensors_io.export_diffusers(params, model_cfg, str(tmp_path / "vae"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  common = ["--config=configs/demo.py", *TINY_CLI_FLAGS, f"--params={tmp_path / 'vae'}"]
  res = subprocess.run([sys.executable, "-m", "vae_scale.encode", *common,
                        f"--output_dir={tmp_path / 'latents'}", "--split=eval"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  summary = json.loads(res.stdout.strip().splitlines()[-1])
  assert summary["count"] == 24 and summary["latent_shape"] == [8, 8, 4]
  z, _, meta = encode.read_latents(str(tmp_path / "latents"))
  assert meta["weights"] == "imported" and z.shape == (24, 8, 8, 4)

  res = subprocess.run([sys.executable, "-m", "vae_scale.evaluate", *common,
                        f"--output_dir={tmp_path / 'eval'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert json.loads(res.stdout.strip().splitlines()[-1])["weights"] == "imported"
  assert (tmp_path / "eval" / "eval_00000000.json").exists()

  # Weights that don't fit the config fail before anything compiles.
  with pytest.raises(ConversionError, match="don't match the model config"):
    evaluate.run(tiny_config(**{"model.ch": 8}), None, params_path=str(tmp_path / "vae"),
                 output_dir=str(tmp_path / "eval2"))


# --------------------------------------------------------------------------- rFID and LPIPS


def _evaluate_cli(tmp_path, *flags):
  """`python -m vae_scale.evaluate --config=tests/tiny_config.py --params=...` on random weights."""
  config = tiny_config()
  model_cfg = AutoencoderConfig.from_config(config)
  if not (tmp_path / "vae").exists():
    safetensors_io.export_diffusers(_random_params(model_cfg, 5), model_cfg, str(tmp_path / "vae"))
  env = cpu_env()
  cmd = [sys.executable, "-m", "vae_scale.evaluate", f"--config={REPO / 'tests' / 'tiny_config.py'}",
         f"--params={tmp_path / 'vae'}", f"--output_dir={tmp_path / 'eval'}", *flags]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_command_line_reports_lpips_and_refuses_a_wrong_inception_file(tmp_path):
  import feature_nets  # pylint: disable=g-import-not-at-top
  from vae_scale.models import frozen_weights  # pylint: disable=g-import-not-at-top
  wrong = feature_nets.tagged_file(tmp_path / "lpips_not_inception.safetensors",
                                   frozen_weights.LPIPS_NET)
  res = _evaluate_cli(tmp_path, f"--inception_weights={wrong}")
  assert res.returncode == 2, res.stderr[-3000:]
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and wrong in errors[0], res.stderr[-3000:]
  assert "python -m vae_scale.convert inception --src=" in errors[0]
  assert "Traceback" not in res.stderr and not (tmp_path / "eval").exists()

  lpips_file, _ = feature_nets.lpips_files(feature_nets.torch_lpips(), str(tmp_path))
  res = _evaluate_cli(tmp_path, f"--lpips_weights={lpips_file}", "--log_every_batches=1")
  assert res.returncode == 0, res.stderr[-3000:]
  *_, table, last = res.stdout.strip().splitlines()
  result = json.loads(last)
  assert result["num_images"] == 8 and result["rfid"] is None and result["lpips"] > 0
  assert table.startswith("step 0 (imported weights): rFID - | PSNR ") and "| SSIM " in table
  assert "| LPIPS " in table and table.endswith("| 8 images")
  assert "Evaluation: 1/1 batches, 8 images" in res.stderr and "ETA" in res.stderr
  saved = json.loads((tmp_path / "eval" / "eval_00000000.json").read_text())
  assert saved["lpips"] == pytest.approx(result["lpips"]) and "lpips_std" in saved


@pytest.mark.slow
def test_inception_weights_reach_the_report_as_rfid(tmp_path, monkeypatch):
  """--inception_weights' path through `evaluate.run` into the JSON (the distance itself is
  checked against pytorch-fid in fid_test, the statistics in evaluator_test)."""
  import feature_nets  # pylint: disable=g-import-not-at-top
  from vae_scale.eval import fid  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fid, "fid_from_stats", lambda real, fake, *unused: float(real.count))
  config = tiny_config()
  model_cfg = AutoencoderConfig.from_config(config)
  safetensors_io.export_diffusers(_random_params(model_cfg, 5), model_cfg, str(tmp_path / "vae"))
  inception_file, _ = feature_nets.inception_files(feature_nets.inception_state_dict(),
                                                   str(tmp_path))
  result = evaluate.run(config, None, params_path=str(tmp_path / "vae"),
                        output_dir=str(tmp_path / "eval"), inception_weights=inception_file)
  assert result["rfid"] == 8.0  # The 8 held-out images' statistics were handed over.
  saved = json.loads((tmp_path / "eval" / "eval_00000000.json").read_text())
  assert saved["rfid"] == 8.0
