"""models.autoencoder: exact parameter counts, shapes, dtypes, posterior behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config
from vae_scale.models import AutoencoderConfig
from vae_scale.models import AutoencoderKL
from vae_scale.models import DiagonalGaussian


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(tree, nnx.Param)))


def test_ldm_f8_parameter_count_is_exact():
  cfg = AutoencoderConfig.from_config(load_config("ldm_f8"))
  model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))  # No 84M allocation.
  assert _count(model) == 83_653_863
  assert _count(model.encoder) == 34_163_592
  assert _count(model.decoder) == 49_490_179
  assert _count(model.quant_conv) == 72
  assert _count(model.post_quant_conv) == 20


def test_ldm_f8_shapes_at_256_without_allocating():
  cfg = AutoencoderConfig.from_config(load_config("ldm_f8"))
  def fwd():
    model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    recon, post = model(jnp.zeros((1, 256, 256, 3)), jax.random.key(1))
    return recon, post.mean, post.logvar
  recon, mean, logvar = jax.eval_shape(fwd)
  assert recon.shape == (1, 256, 256, 3)
  assert mean.shape == logvar.shape == (1, 32, 32, 4)


@pytest.mark.parametrize("size", [64, 256])
def test_tiny_encoder_decoder_shapes(size):
  cfg = AutoencoderConfig(ch=4, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=2,
                          resolution=size, attn_resolutions=(size // 4,))
  model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), (2, size, size, 3), minval=-1, maxval=1)
  post = model.encode(x)
  assert post.mean.shape == (2, size // 8, size // 8, 4)
  recon = model.decode(post.sample(jax.random.key(1)))
  assert recon.shape == x.shape and recon.dtype == jnp.float32
  assert np.isfinite(np.asarray(recon)).all()
  # Attention at size//4 appears in one encoder and one decoder level.
  assert len(model.encoder.down_blocks[2].attentions) == 1
  assert len(model.decoder.up_blocks[1].attentions) == 2


def test_downsample_pads_right_and_bottom_only():
  cfg = AutoencoderConfig(ch=4, ch_mult=(1, 1), num_res_blocks=1, norm_groups=2, resolution=8)
  from vae_scale.models.autoencoder import Downsample  # pylint: disable=g-import-not-at-top
  down = Downsample(1, cfg, rngs=nnx.Rngs(0))
  down.conv.kernel.value = jnp.ones((3, 3, 1, 1))
  down.conv.bias.value = jnp.zeros((1,))
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  y = np.asarray(down(x))[0, :, :, 0]
  xp = np.pad(np.arange(16.0).reshape(4, 4), ((0, 1), (0, 1)))
  want = np.array([[xp[i:i + 3, j:j + 3].sum() for j in (0, 2)] for i in (0, 2)])
  np.testing.assert_allclose(y, want)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  cfg = AutoencoderConfig(ch=4, ch_mult=(1, 2), num_res_blocks=1, norm_groups=2, resolution=16,
                          dtype=jnp.bfloat16)
  model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  recon, post = model(jnp.zeros((2, 16, 16, 3)), jax.random.key(0))
  assert recon.dtype == jnp.float32 and post.mean.dtype == jnp.float32


def test_logvar_is_clamped():
  moments = jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 100.0)], -1)
  assert float(DiagonalGaussian(moments).logvar.max()) == 20.0
  moments = moments.at[..., 4:].set(-100.0)
  assert float(DiagonalGaussian(moments).logvar.min()) == -30.0


def test_reparameterized_samples_match_posterior_moments():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(1, 2, 2, 4)).astype(np.float32)
  logvar = rng.uniform(-2, 1, size=(1, 2, 2, 4)).astype(np.float32)
  post = DiagonalGaussian(jnp.concatenate([mean, logvar], -1))
  keys = jax.random.split(jax.random.key(0), 20_000)
  draws = np.asarray(jax.vmap(post.sample)(keys))
  np.testing.assert_allclose(draws.mean(0), mean, atol=0.05)
  np.testing.assert_allclose(draws.var(0), np.exp(logvar), rtol=0.05)
  np.testing.assert_array_equal(np.asarray(post.mode()), mean)


def test_dropout_uses_rngs_only_in_training():
  cfg = AutoencoderConfig(ch=4, ch_mult=(1, 2), num_res_blocks=1, norm_groups=2, resolution=16,
                          dropout=0.5)
  model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3), minval=-1, maxval=1)
  a, _ = model(x)
  b, _ = model(x)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c, _ = model(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_remat_gives_the_same_gradients():
  def grads(remat):
    cfg = AutoencoderConfig(ch=4, ch_mult=(1, 2), num_res_blocks=1, norm_groups=2, resolution=16,
                            remat=remat)
    model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    loss = lambda m: jnp.mean(jnp.abs(m(x)[0] - x))
    return nnx.grad(loss)(model)
  g0, g1 = grads("none"), grads("block")
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
