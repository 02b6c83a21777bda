"""accumulate: k micro-batches in one step equal one step on the whole batch (autoencoder only)."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from vae_scale.models import frozen_weights
from vae_scale.training import programs
from vae_scale.training import sharding
from vae_scale.run import state_tree
from vae_scale.data import pipeline


def _one_step(config):
  mesh = sharding.create_mesh()
  progs = programs.build(config, mesh, dinov2=frozen_weights.load_vf_dinov2(config))
  local = next(iter(pipeline.create_train_dataset(config, 0, 1)))
  state = progs.init()
  _, step = progs.step_at(0, False, np.asarray(state.rng))  # EQ-VAE: the view step 0 draws.
  state, m = step(state, sharding.global_batch({"image": local["image"]}, mesh))
  return jax.tree.map(np.asarray, state), {k: float(v) for k, v in m.compute().items()}


@pytest.mark.slow
def test_accumulating_micro_batches_equals_one_step_on_the_whole_batch():
  base = {"global_batch_size": 16, "optimizer.learning_rate": 1e-3}
  whole, m1 = _one_step(tiny_config(**base))
  accum, m4 = _one_step(tiny_config(**base, **{"optimizer.grad_accum_steps": 4}))
  # The gradients, through Adam's first moment mu = (1 - b1) * g after one step (the parameters
  # themselves move by lr * sign(g) on Adam's first step: noise where g is ~0, e.g. to_k's bias,
  # whose exact gradient is 0 because softmax ignores a key bias).
  moment = lambda s: {k: v for k, v in state_tree.flat(s.opt_state).items() if "/mu/" in k}
  a, b = moment(whole), moment(accum)
  scale = max(float(np.max(np.abs(v))) for v in a.values())
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a) / scale
  print(f"worst |g_accum - g_whole| / max|g| = {worst:.3g}")
  assert worst < 1e-5, worst
  for name in ("loss", "l1", "ssim_loss", "kl", "psnr"):
    assert m4[name] == pytest.approx(m1[name], rel=1e-5), name
  assert m4["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_accumulating_with_the_vf_and_eq_terms_equals_one_step_on_the_whole_batch(tmp_path):
  """With a constant VF weight (its adaptive weight is each micro-batch's own) and EQ-VAE's tau
  steps (the same view and rotation for every micro-batch), the gradients are the batch's: the
  projection's and the autoencoder's."""
  import feature_nets  # pylint: disable=g-import-not-at-top
  base = {"global_batch_size": 16, "optimizer.learning_rate": 1e-3, "image_size": 32,
          "model.ch_mult": (1, 1, 1, 1, 1), "loss.vf_weight": 0.5, "loss.vf_adaptive": False,
          "loss.vf_feature_dim": 16,
          "loss.vf_weights": feature_nets.dinov2_file(tmp_path / "d.safetensors", 16),
          "loss.equivariance_weight": 1.0, "loss.equivariance_prob": 1.0,
          "loss.equivariance_scales": (0.5,)}
  whole, m1 = _one_step(tiny_config(**base))
  accum, m2 = _one_step(tiny_config(**base, **{"optimizer.grad_accum_steps": 2}))
  moment = lambda s: {k: v for k, v in state_tree.flat(s.opt_state).items() if "/mu/" in k}
  a, b = moment(whole), moment(accum)
  assert any("vf_proj" in k for k in a)
  scale = max(float(np.max(np.abs(v))) for v in a.values())
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a) / scale
  assert worst < 1e-5, worst
  assert m1["eq_tau_steps"] == 1  # The step was one of EQ-VAE's transformed views.
  for name in ("loss", "l1", "kl", "psnr", "vf_loss", "eq_tau_steps"):
    assert m2[name] == pytest.approx(m1[name], rel=1e-5), name


@pytest.mark.slow
def test_accumulation_with_the_discriminator_trains_both_networks():
  config = tiny_config(**{"disc.enabled": True, "disc.filters": 8, "disc.n_layers": 2,
                          "disc.start_step": 0, "image_size": 32, "global_batch_size": 16,
                          "optimizer.grad_accum_steps": 2})
  mesh = sharding.create_mesh()
  progs = programs.build(config, mesh)
  state = progs.init()
  before = jax.tree.map(np.asarray, (state.params, state.disc_params))
  local = next(iter(pipeline.create_train_dataset(config, 0, 1)))
  state, m = progs.gan_step(state, sharding.global_batch({"image": local["image"]}, mesh))
  values = {k: float(v) for k, v in m.compute().items()}
  assert all(np.isfinite(v) for v in values.values()), values
  assert values["d_weight"] > 0 and values["g_loss"] != 0
  for old, new in zip(before, (state.params, state.disc_params)):
    assert any(not np.array_equal(x, np.asarray(y))
               for x, y in zip(jax.tree.leaves(old), jax.tree.leaves(new)))


def test_a_batch_that_does_not_split_into_micro_batches_is_one_line():
  from vae_scale.config import schema  # pylint: disable=g-import-not-at-top
  from vae_scale.errors import ConfigError  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r"config.global_batch_size: 8 is not divisible by the 8 "
                     r"devices x 2 micro-batches .*use a multiple of 16"):
    schema.validate(tiny_config(**{"optimizer.grad_accum_steps": 2}), num_devices=8)
