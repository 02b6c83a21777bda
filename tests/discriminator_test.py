"""models.discriminator (PatchGAN) and the adversarial part of a run: losses, adaptive weight,
disc_start, EMA, on tiny models."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from vae_scale.training import losses
from vae_scale.training import sharding
from vae_scale.run import loop
from vae_scale.models import DiscriminatorConfig
from vae_scale.models import NLayerDiscriminator


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(tree, nnx.Param)))


def test_discriminator_parameter_count_and_logits_shape():
  cfg = DiscriminatorConfig()
  disc = nnx.eval_shape(lambda: NLayerDiscriminator(cfg, rngs=nnx.Rngs(0)))
  assert _count(disc) == 2_765_633
  logits = jax.eval_shape(lambda: NLayerDiscriminator(cfg, rngs=nnx.Rngs(0))(
      jnp.zeros((2, 256, 256, 3))))
  assert logits.shape == (2, 30, 30, 1)


def test_discriminator_init_statistics():
  disc = NLayerDiscriminator(DiscriminatorConfig(filters=16), rngs=nnx.Rngs(0))
  k = np.asarray(disc.convs[1].kernel.value)
  assert abs(k.std() - 0.02) < 0.002 and abs(k.mean()) < 0.002
  s = np.asarray(disc.norms[1].norm.scale.value)
  assert abs(s.mean() - 1.0) < 0.01 and 0.01 < s.std() < 0.03


def test_hinge_and_vanilla_losses_on_hand_made_logits():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 3.0])
  # hinge: relu(1 - real) = [0, .5, 2] -> mean 5/6; relu(1 + fake) = [0, 1, 4] -> mean 5/3.
  assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 5 / 3))
  sp = lambda v: np.log1p(np.exp(v))
  want = 0.5 * (np.mean(sp(-np.asarray(real))) + np.mean(sp(np.asarray(fake))))
  assert float(losses.vanilla_d_loss(real, fake)) == pytest.approx(want, rel=1e-6)
  assert float(losses.generator_loss(fake)) == pytest.approx(-1 / 3)


def test_ema_update():
  ema = {"w": jnp.array([1.0, 2.0])}
  new = {"w": jnp.array([3.0, 6.0])}
  import optax  # pylint: disable=g-import-not-at-top
  out = optax.incremental_update(new, ema, step_size=1 - 0.9)
  np.testing.assert_allclose(np.asarray(out["w"]), 0.9 * np.array([1, 2]) + 0.1 * np.array([3, 6]))


def _gan_config(**kw):
  return tiny_config(**{"disc.enabled": True, "disc.filters": 8, "disc.n_layers": 2,
                        "image_size": 32, "ema_decay": 0.9, **kw})


@pytest.mark.slow
def test_batch_norm_statistics_agree_on_1_and_8_devices():
  cfg = DiscriminatorConfig(filters=8, n_layers=2)
  disc = NLayerDiscriminator(cfg, rngs=nnx.Rngs(0))
  graphdef, params, stats = nnx.split(disc, nnx.Param, nnx.BatchStat)
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))

  def fwd(params, stats, x):
    d = nnx.merge(graphdef, params, stats)
    logits = d(x, train=True)
    return logits, nnx.state(d, nnx.BatchStat)

  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.create_mesh(devices)
    xs = jax.device_put(x, sharding.batch_sharding(mesh))
    rep = sharding.replicated(mesh)
    out = jax.jit(fwd, in_shardings=(rep, rep, sharding.batch_sharding(mesh)),
                  out_shardings=(sharding.batch_sharding(mesh), rep))(params, stats, xs)
    results.append(jax.tree.map(np.asarray, out))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *results)
  # And they are the statistics of the whole batch, not of one device's share.
  mean = np.asarray(results[1][1]["norms"][0]["norm"]["mean"].value)
  assert not np.allclose(mean, 0)


@pytest.mark.slow
def test_end_to_end_adversarial_run_trains_past_disc_start_and_resumes(tmp_path):
  config = _gan_config(**{"disc.start_step": 2, "num_train_steps": 4,
                          "checkpoint_every_steps": 2, "log_every_steps": 1})
  run = str(tmp_path / "gan")
  straight = loop.train_and_evaluate(config, str(tmp_path / "straight"))
  half = _gan_config(**{"disc.start_step": 2, "num_train_steps": 3,
                        "checkpoint_every_steps": 3, "log_every_steps": 1})
  loop.train_and_evaluate(half, run)
  resumed = loop.train_and_evaluate(config, run)
  for a, b in ((straight.params, resumed.params), (straight.disc_params, resumed.disc_params),
               (straight.disc_stats, resumed.disc_stats), (straight.ema_params, resumed.ema_params)):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["3", "4"]
