"""bench_step and bench/torch_reference.py: the benchmark commands, bf16 compute and remat."""

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from conftest import load_config
from conftest import tiny_config
from vae_scale.tools import bench_costs
from vae_scale.tools import bench_step
from vae_scale.training import losses
from vae_scale.interop import names
from vae_scale.models import AutoencoderConfig
from vae_scale.models import AutoencoderKL

# The tiny config's discriminator must see a 16 px image through to non-empty logits.
SMALL_DISC = ["--config.disc.n_layers=1", "--config.disc.filters=8"]


def _torch_reference():
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  spec = importlib.util.spec_from_file_location("torch_reference",
                                                REPO / "bench" / "torch_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --------------------------------------------------------------------------- cost model


def test_analytic_macs_match_the_kl_f8_reference():
  macs = bench_costs.analytic_forward_macs(AutoencoderConfig.from_config(load_config("ldm_f8")))
  # DESIGN.md: 447.5 GMAC per 256² image = encoder 136.4 + decoder 311.1.
  assert macs["encoder"] / 1e9 == pytest.approx(136.4, abs=0.05)
  assert macs["decoder"] / 1e9 == pytest.approx(311.1, abs=0.05)
  assert macs["total"] / 1e9 == pytest.approx(447.5, abs=0.05)


def test_peak_table_knows_accelerators_and_not_cpus():
  assert bench_costs.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert bench_costs.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert bench_costs.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 156.0
  assert bench_costs.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert bench_costs.peak_tflops("cpu", "bfloat16") is None


def test_model_flops_fall_back_to_the_analytic_count_where_xla_leaves_out_the_convolutions():
  analytic = 2.685e12
  assert bench_costs.model_flops(2.656e12, analytic) == (2.656e12, "xla")  # CPU: XLA counts them.
  # GPU (H100, ldm_f8): cuDNN convolutions are custom calls outside XLA's count (20 GFLOP/img).
  assert bench_costs.model_flops(20.3e9, analytic) == (analytic, "analytic")
  assert bench_costs.model_flops(None, analytic) == (analytic, "analytic")  # No cost analysis.


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def bf16_report(tmp_path_factory):
  """The command on the tiny config in bfloat16, both steps, 8 simulated devices."""
  out = tmp_path_factory.mktemp("bench") / "report.json"
  code = bench_step.main(["--config=" + str(REPO / "tests" / "tiny_config.py"), *SMALL_DISC,
                          "--config.model.dtype=bfloat16", "--steps=2", "--warmup=1",
                          "--adversarial=both", f"--json_out={out}"])
  assert code == 0  # 3 would mean a non-finite loss.
  return json.loads(out.read_text())


def test_main_reports_both_steps_with_xla_flops_near_the_analytic_count(bf16_report):
  ae, gan = bf16_report["results"]
  assert (ae["variant"], gan["variant"]) == ("ae", "gan")
  assert bf16_report["device"]["num_devices"] == jax.device_count()
  assert bf16_report["batch_per_device"] == 8 // jax.device_count()
  analytic = bf16_report["analytic_train_gflop_per_image"] * 1e9
  # XLA's count adds normalization, activations, SSIM and the optimizer to 6 x conv MACs.
  assert 0.95 * analytic < ae["xla_flops_per_image"] < 1.6 * analytic
  assert ae["model_flops_per_image"] == ae["xla_flops_per_image"]  # No remat: nothing recomputed.
  assert ae["model_flops_source"] == gan["model_flops_source"] == "xla"
  assert gan["xla_flops_per_image"] > ae["xla_flops_per_image"]  # Plus D forward/backward twice.
  for row in (ae, gan):
    assert row["finite"] and row["images_per_s_per_device"] > 0 and row["step_time_median_s"] > 0
    assert row["compile_s"] > 0 and row["xla_memory_bytes"]["temp"] > 0
    assert row["mfu"] is None and row["device_peak_bytes"] is None  # CPU: no peak, no stats.
  assert bf16_report["dtype"] == "bfloat16"
  assert bf16_report["overrides"] == {"disc.n_layers": "1", "disc.filters": "8",
                                      "model.dtype": "bfloat16"}


def test_main_rejects_a_bad_config_field(capsys):
  code = bench_step.main(["--config=" + str(REPO / "tests" / "tiny_config.py"),
                          "--config.model.dtype=float16", "--steps=1"])
  assert code == 2 and "model.dtype" in capsys.readouterr().err


def test_bfloat16_step_keeps_float32_params_and_optimizer_state():
  config = tiny_config(**{"model.dtype": "bfloat16", "disc.enabled": True, "disc.n_layers": 1,
                          "disc.filters": 8})
  lowered, _, _ = bench_step.lower_step(config, "gan", 8, jax.devices())
  state_info, _ = lowered.out_info
  floats = [leaf.dtype for leaf in jax.tree.leaves(state_info)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert floats and all(d == jnp.float32 for d in floats)  # Params, Adam moments, EMA, D stats.


def test_largest_batch_search_doubles_then_bisects(monkeypatch):
  tried = []

  def fake_fits(config, variant, b, devices, *, memory_limit_bytes, execute):
    del config, variant, devices, memory_limit_bytes, execute
    tried.append(b)
    return b <= 13, {"batch_per_device": b, "fits": b <= 13}

  monkeypatch.setattr(bench_step, "batch_fits", fake_fits)
  found = bench_step.find_max_batch(None, "ae", [], max_batch=1024)
  assert found["max_batch_per_device"] == 13 and not found["capped"]
  assert tried == [1, 2, 4, 8, 16, 12, 14, 13]
  tried.clear()
  assert bench_step.find_max_batch(None, "ae", [], max_batch=8)["capped"]


# --------------------------------------------------------------------------- remat


def test_remat_block_and_level_give_the_same_gradients():
  """With dropout on: the recomputed blocks must redraw the same masks."""
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  results = {}
  for remat in ("none", "block", "level"):
    cfg = AutoencoderConfig(ch=4, ch_mult=(1, 2), num_res_blocks=1, norm_groups=2, resolution=16,
                            dropout=0.1, remat=remat)
    graphdef, params = nnx.split(AutoencoderKL(cfg, rngs=nnx.Rngs(0)))

    def loss(p, graphdef=graphdef):
      model = nnx.merge(graphdef, p)
      recon, post = model(x, jax.random.key(1), deterministic=False, rngs=nnx.Rngs(dropout=2))
      return losses.l1_loss(x, recon) + 1e-3 * losses.kl_loss(post)

    results[remat] = jax.value_and_grad(loss)(params)  # Eager: cheaper than 3 compiles here.
  l0, g0 = results["none"]
  for remat in ("block", "level"):
    l1, g1 = results[remat]
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_remat_keeps_fewer_activations_for_the_backward_pass():
  """JAX's saved residuals per image (XLA's CPU buffer assignment does not show remat's saving)."""
  kept = {(remat, dtype): bench_costs.activation_bytes_per_image(
      tiny_config(**{"model.remat": remat, "model.dtype": dtype}))
          for remat in ("none", "block", "level") for dtype in ("float32", "bfloat16")}
  for dtype in ("float32", "bfloat16"):
    assert kept["block", dtype] < 0.5 * kept["none", dtype]
    assert kept["level", dtype] < kept["block", dtype]
  assert kept["none", "bfloat16"] < 0.8 * kept["none", "float32"]  # bf16 activations: half size.


# --------------------------------------------------------------------------- torch reference


def test_torch_ssim_matches_dm_pix():
  torch_ref = _torch_reference()
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (2, 24, 20, 3)).astype(np.float32)
  b = np.clip(a + 0.3 * rng.standard_normal(a.shape), -1.5, 1.5).astype(np.float32)
  nchw = lambda v: torch.from_numpy(v.transpose(0, 3, 1, 2).copy())
  got = torch_ref.ssim((nchw(a) + 1) * 0.5, (nchw(b) + 1) * 0.5).numpy()
  np.testing.assert_allclose(got, np.asarray(losses.ssim(a, b)), rtol=1e-5, atol=1e-6)


def test_torch_step_computes_vae_scale_loss_on_the_same_weights():
  torch_ref = _torch_reference()
  import torch  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{"image_size": 32, "loss.kl_weight": 0.1})
  model_cfg = AutoencoderConfig.from_config(config)
  model = AutoencoderKL(model_cfg, rngs=nnx.Rngs(3))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  post = model.encode(x)
  noise = rng.standard_normal(post.mean.shape).astype(np.float32)
  recon = model.decode(post.mean + post.std * noise)
  want, _ = losses.autoencoder_loss(x, recon, post, l1_weight=config.loss.l1_weight,
                                    ssim_weight=config.loss.ssim_weight,
                                    kl_weight=config.loss.kl_weight)

  step = torch_ref.TrainStep(config, torch.device("cpu"), compile_model=False)
  state = {k: torch.from_numpy(np.array(v))
           for k, v in names.to_diffusers_state_dict(params).items()}
  step.model.load_state_dict(state)
  assert sum(p.numel() for p in step.params) == sum(v.size for v in jax.tree.leaves(params))
  nchw = lambda v: torch.from_numpy(v.transpose(0, 3, 1, 2).copy())
  got, _, got_recon, _ = step.forward(nchw(x), nchw(noise))
  np.testing.assert_allclose(got_recon.numpy().transpose(0, 2, 3, 1), np.asarray(recon),
                             atol=2e-5)
  assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
  metrics = step(nchw(x), nchw(noise))  # A whole step runs and reports vae_scale's metrics.
  assert {"loss", "grad_norm", "psnr", "ssim", "latent_std"} <= set(metrics)


@pytest.mark.slow
def test_torch_reference_command_runs_an_eager_step_next_to_vae_scale(tmp_path):
  _torch_reference()
  out = tmp_path / "ref.json"
  proc = subprocess.run(
      [sys.executable, str(REPO / "bench" / "torch_reference.py"),
       "--config=" + str(REPO / "tests" / "tiny_config.py"), "--batch=2", "--steps=1",
       "--warmup=1", "--modes=eager", f"--json_out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  (row,) = report["torch"]
  assert row["mode"] == "eager" and row["finite"] and row["images_per_s"] > 0
  assert report["vae_scale"]["results"][0]["batch_per_device"] == 2
  assert row["ratio_vae_scale_over_torch"] > 0
  assert "vae_scale/torch" in proc.stdout
