"""The real training loop on a tiny config: one step learns, end to end, exact resume, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import cpu_env
from conftest import REPO
from conftest import tiny_config
import feature_nets
from vae_scale.run import checkpoints
from vae_scale.eval import report
from vae_scale.training import programs
from vae_scale.training import sharding
from vae_scale.run import loop
from vae_scale.data import pipeline
from vae_scale.models import frozen_weights


@pytest.mark.slow
def test_one_train_step_lowers_the_loss_on_a_fixed_batch():
  config = tiny_config(**{"optimizer.learning_rate": 3e-3})
  mesh = sharding.create_mesh()
  progs = programs.build(config, mesh)
  state = progs.init()
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
  step = progs.ae_step
  local = next(iter(pipeline.create_train_dataset(config, 0, 1)))
  batch = sharding.global_batch({"image": local["image"]}, mesh)
  losses = []
  for _ in range(5):
    state, m = step(state, batch)
    losses.append(float(m.compute()["loss"]))
  assert int(state.step) == 5
  assert losses[1] < losses[0] and losses[-1] < losses[0], losses


def _params(state):
  return jax.tree.map(np.asarray, state.params)


@pytest.mark.slow
def test_end_to_end_then_resume_matches_an_uninterrupted_run_exactly(tmp_path):
  config = tiny_config(num_train_steps=4, checkpoint_every_steps=2)
  straight = loop.train_and_evaluate(config, str(tmp_path / "a"))

  config_b = tiny_config(num_train_steps=2, checkpoint_every_steps=2)
  first = loop.train_and_evaluate(config_b, str(tmp_path / "b"))
  assert int(first.step) == 2
  resumed = loop.train_and_evaluate(config, str(tmp_path / "b"))
  assert int(resumed.step) == int(straight.step) == 4
  jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, straight.opt_state),
               jax.tree.map(np.asarray, resumed.opt_state))

  # The run left checkpoints, TensorBoard events and PNG grids behind.
  run = tmp_path / "b"
  assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run))
  assert (run / "images" / "reconstructions_00000000.png").exists()
  assert (run / "images" / "reconstructions_00000004.png").exists()
  # The eval history spans both sessions, and the resumed run's last evaluation is the straight one's.
  history = report.read_history(run)
  assert [r["step"] for r in history] == [0, 2, 4]
  assert history[-1]["psnr"] == pytest.approx(report.read_history(tmp_path / "a")[-1]["psnr"], abs=1e-5)
  assert str(run / "images" / "reconstructions_00000004.png") in report.history_summary(history)

  # The data position saved at step 2 (global examples consumed) continues with exactly the batch
  # an uninterrupted stream yields third.
  fresh = iter(pipeline.create_train_dataset(config, 0, 1))
  third = [next(fresh) for _ in range(3)][-1]
  record = json.loads((run / "checkpoints" / "2" / "data" / "metadata").read_text())
  assert record["global_examples"] == 2 * config.global_batch_size
  restored = iter(pipeline.create_train_dataset(config, 0, 1, start=record["global_examples"]))
  np.testing.assert_array_equal(next(restored)["image"], third["image"])
  # The run's config is stored with every checkpoint, in the same commit.
  assert checkpoints.stored_config(run / "checkpoints", 4)["num_train_steps"] == 4


def _main(tmp_path, *overrides, config=REPO / "configs" / "demo.py"):
  """`python -m vae_scale.main --config=CONFIG --workdir=TMP/run OVERRIDES`, as a user runs it."""
  env = cpu_env()
  cmd = [sys.executable, "-m", "vae_scale.main", f"--config={config}",
         f"--workdir={tmp_path / 'run'}", *overrides]
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_batch_not_divisible_by_devices_fails_before_compiling(tmp_path):
  res = _main(tmp_path, "--config.global_batch_size=12")
  assert res.returncode == 2
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert errors == ["error: config.global_batch_size: 12 is not divisible by the 8 devices; "
                    "use a multiple of 8 (the nearest: 8 or 16)"], res.stderr[-2000:]
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_missing_folder_fails_with_one_line(tmp_path):
  res = _main(tmp_path, "--config.data.source=folder", f"--config.data.path={tmp_path}/missing")
  assert res.returncode == 2
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "missing" in errors[0] and "does not exist" in errors[0]


@pytest.mark.slow
def test_init_from_another_run_and_freeze_encoder_trains_the_decoder_only(tmp_path):
  source = str(tmp_path / "source")
  loop.train_and_evaluate(tiny_config(num_train_steps=2), source)
  start, _ = checkpoints.read_state(source)
  config = tiny_config(num_train_steps=2, init_from=source, freeze_encoder=True,
                       **{"optimizer.name": "adamw", "optimizer.weight_decay": 0.1})
  state = loop.train_and_evaluate(config, str(tmp_path / "finetune"))
  params = jax.tree.map(np.asarray, state.params)
  for part in ("encoder", "quant_conv"):
    a, b = jax.tree.leaves(start["params"][part]), jax.tree.leaves(params[part])
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start["params"]["decoder"]),
                                                    jax.tree.leaves(params["decoder"]))]
  assert all(moved)


@pytest.mark.slow
def test_init_from_a_wrong_path_is_one_clear_line(tmp_path):
  res = _main(tmp_path, f"--config.init_from={tmp_path}/nothing_here")
  assert res.returncode == 2
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "nothing_here" in errors[0], res.stderr[-2000:]


@pytest.mark.slow
def test_misspelt_config_override_is_one_clear_line(tmp_path):
  res = _main(tmp_path, "--config.model.chh=3")
  assert res.returncode == 2
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "chh" in errors[0] and 'did you mean "ch"' in errors[0], res.stderr
  assert "Traceback" not in res.stderr


# --------------------------------------------------------------------------- LPIPS in the loss


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
  """LPIPS-VGG weights converted from a seeded random VGG (tests/feature_nets.py)."""
  return feature_nets.lpips_files(feature_nets.torch_lpips(),
                                  str(tmp_path_factory.mktemp("lpips")))[0]


@pytest.mark.slow
def test_train_step_with_lpips_in_ldm_units_is_finite_and_lpips_is_not_state(lpips_file):
  config = tiny_config(**{"loss.perceptual_weight": 1.0, "loss.lpips_weights": lpips_file,
                          "loss.reduction": "ldm_sum", "loss.l2_weight": 0.5,
                          "loss.ssim_weight": 0.0, "loss.kl_weight": 1e-6})
  mesh = sharding.create_mesh()
  progs = programs.build(config, mesh, lpips_params=frozen_weights.load_lpips_params(lpips_file))
  # The LPIPS params ride along as a jit argument: the TrainState (and so every checkpoint) is the
  # one a run without LPIPS has.
  plain = programs.build(tiny_config(), mesh)
  assert jax.tree.structure(progs.abstract_state) == jax.tree.structure(plain.abstract_state)
  assert progs.ae_step.lpips_params is not None and plain.ae_step.lpips_params is None
  state = progs.init()
  local = next(iter(pipeline.create_train_dataset(config, 0, 1)))
  batch = sharding.global_batch({"image": local["image"]}, mesh)
  for _ in range(2):
    state, m = progs.ae_step(state, batch)
    v = {k: float(x) for k, x in m.compute().items()}
    assert all(np.isfinite(x) for x in v.values()), v
    assert v["lpips"] > 0
    # LDM's units: the reconstruction summed over the 16x16x3 elements of an image.
    np.testing.assert_allclose(v["rec_loss"], 768 * (v["l1"] + 0.5 * v["l2"] + v["lpips"]),
                               rtol=1e-5)
  assert int(state.step) == 2


def _main_tiny(tmp_path, *overrides):
  return _main(tmp_path, *overrides, config=REPO / "tests" / "tiny_config.py")


def _one_error_line(res) -> str:
  assert res.returncode == 2, res.stderr[-3000:]
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  return errors[0]


@pytest.mark.slow
def test_perceptual_weight_without_lpips_weights_is_one_line(tmp_path):
  line = _one_error_line(_main_tiny(tmp_path, "--config.loss.perceptual_weight=1.0"))
  assert line.startswith("error: config.loss.lpips_weights: empty"), line
  assert "python -m vae_scale.convert lpips --out=" in line
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_lpips_weights_of_another_network_fail_before_compiling(tmp_path):
  wrong = feature_nets.tagged_file(tmp_path / "inception.safetensors", frozen_weights.INCEPTION_NET)
  line = _one_error_line(_main_tiny(tmp_path, "--config.loss.perceptual_weight=1.0",
                                    f"--config.loss.lpips_weights={wrong}"))
  assert wrong in line and frozen_weights.INCEPTION_NET in line, line
  assert f"python -m vae_scale.convert lpips --out={wrong}" in line
  assert not (tmp_path / "run" / "checkpoints").exists()
