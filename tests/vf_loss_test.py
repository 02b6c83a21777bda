"""training.vf_loss against LightningDiT's formulas written directly in torch (NCHW, as its
vavae/ldm/modules/losses/contperceptual.py computes them): values, gradients, adaptive weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vae_scale.training import vf_loss

B, H, W, C, D = 3, 4, 5, 6, 24  # A 4 x 5 latent grid, 6 latent channels, 24-wide "DINOv2".


def _torch_vf(z, aux_feature, cos_margin, distmat_margin, distmat_weight=1.0, cos_weight=1.0):
  """LightningDiT's vf_loss on NCHW tensors: z the projected latents, aux_feature DINOv2's."""
  z_flat = z.flatten(2)  # b c (h w)
  aux_flat = aux_feature.flatten(2)
  z_norm = F.normalize(z_flat, dim=1)
  aux_norm = F.normalize(aux_flat, dim=1)
  z_cos_sim = torch.einsum("bci,bcj->bij", z_norm, z_norm)
  aux_cos_sim = torch.einsum("bci,bcj->bij", aux_norm, aux_norm)
  diff = torch.abs(z_cos_sim - aux_cos_sim)
  vf_loss_1 = F.relu(diff - distmat_margin).mean()
  vf_loss_2 = F.relu(1 - cos_margin - F.cosine_similarity(aux_feature, z)).mean()
  return vf_loss_1 * distmat_weight + vf_loss_2 * cos_weight, vf_loss_1, vf_loss_2


def _data(seed=0):
  """Latent samples [B, H, W, C], features [B, H, W, D] with structure shared across positions
  (low rank plus noise, so the cosine matrices are far from 0 and from 1) and a projection."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(B, H, W, C)).astype(np.float32)
  basis = rng.normal(size=(3, D))
  features = (rng.normal(size=(B, H, W, 3)) @ basis + 0.3 * rng.normal(size=(B, H, W, D)))
  kernel = np.asarray(vf_loss.init_projection(jax.random.key(seed), C, D))
  return z, features.astype(np.float32), kernel


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("margins", [(0.0, 0.0), (0.5, 0.25), (0.9, 0.05)])
def test_loss_and_gradients_match_lightningdit(margins):
  cos_margin, distmat_margin = margins
  cfg = vf_loss.VFLossConfig(weight=0.5, margin_cos=cos_margin, margin_distmat=distmat_margin)
  z, features, kernel = _data()
  # torch: the reverse projection is Conv2d(C, D, 1, bias=False) with weight [D, C, 1, 1].
  zt = _nchw(z).requires_grad_(True)
  wt = torch.from_numpy(kernel.T[:, :, None, None].copy()).requires_grad_(True)
  ref, ref_distmat, ref_cos = _torch_vf(F.conv2d(zt, wt), _nchw(features), cos_margin,
                                        distmat_margin)
  ref.backward()
  ref, ref_distmat, ref_cos = ref.detach(), ref_distmat.detach(), ref_cos.detach()

  def loss(z, kernel):
    return vf_loss.vf_loss(vf_loss.project(kernel, z), features, cfg)

  (out, terms), (gz, gk) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      z, kernel)
  assert 0.0 < float(ref_cos) and 0.0 < float(ref_distmat)  # Margins leave both terms active.
  np.testing.assert_allclose(float(out), float(ref), rtol=1e-5)
  np.testing.assert_allclose(float(terms["vf_cos"]), float(ref_cos), rtol=1e-5)
  np.testing.assert_allclose(float(terms["vf_distmat"]), float(ref_distmat), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gz), zt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(np.asarray(gk), wt.grad.numpy()[:, :, 0, 0].T, rtol=1e-4, atol=1e-7)


def test_adaptive_weight_matches_lightningdit():
  """calculate_adaptive_weight_vf on a toy autoencoder: the encoder's last layer W a 1x1 conv
  from features h to the moments, the posterior sample from fixed noise, a 1x1 "decoder", nll =
  sum |x - decode(z)| / B, vf on the projected sample; grads w.r.t. W from torch.autograd.grad."""
  rng = np.random.default_rng(1)
  z_np, features, kernel = _data(1)
  h = rng.normal(size=(B, H, W, 8)).astype(np.float32)
  w_enc = (0.3 * rng.normal(size=(8, 2 * C))).astype(np.float32)
  w_dec = (0.3 * rng.normal(size=(C, 3))).astype(np.float32)
  noise = rng.normal(size=(B, H, W, C)).astype(np.float32)
  x = rng.uniform(-1, 1, size=(B, H, W, 3)).astype(np.float32)
  vf_weight, cfg = 0.1, vf_loss.VFLossConfig(margin_cos=0.0, margin_distmat=0.0)

  def sample(w):
    moments = jnp.einsum("bhwi,io->bhwo", h, w)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean + jnp.exp(0.5 * logvar) * noise

  nll = lambda w: jnp.sum(jnp.abs(x - jnp.einsum("bhwc,co->bhwo", sample(w), w_dec))) / B
  vf = lambda w: vf_loss.vf_loss(vf_loss.project(kernel, sample(w)), features, cfg)[0]
  out = vf_loss.adaptive_vf_weight(jax.grad(nll)(w_enc), jax.grad(vf)(w_enc), vf_weight)

  wt = torch.from_numpy(w_enc).requires_grad_(True)
  moments = torch.einsum("bhwi,io->bhwo", torch.from_numpy(h), wt)
  mean, logvar = moments.chunk(2, dim=-1)
  zt = mean + torch.exp(0.5 * logvar) * torch.from_numpy(noise)
  nll_t = torch.sum(torch.abs(torch.from_numpy(x) - zt @ torch.from_numpy(w_dec))) / B
  proj = torch.from_numpy(kernel.T[:, :, None, None].copy())
  vf_t = _torch_vf(F.conv2d(zt.permute(0, 3, 1, 2), proj), _nchw(features), 0.0, 0.0)[0]
  nll_grads = torch.autograd.grad(nll_t, wt, retain_graph=True)[0]
  vf_grads = torch.autograd.grad(vf_t, wt, retain_graph=True)[0]
  ref = torch.clamp(torch.norm(nll_grads) / (torch.norm(vf_grads) + 1e-4), 0.0, 1e8) * vf_weight
  assert float(ref) > 0.1  # A ratio far from 1: the norms and the factor are checked.
  np.testing.assert_allclose(float(out), float(ref), rtol=1e-5)
  # No gradient flows through the weight; the clamp bites on a vanishing vf gradient.
  assert float(jax.grad(lambda g: vf_loss.adaptive_vf_weight(g, g, 1.0))(jnp.ones(3))[0]) == 0.0
  big = vf_loss.adaptive_vf_weight(jnp.full((3,), 1e6), jnp.zeros(3), 1.0)
  np.testing.assert_allclose(float(big), 1e8, rtol=1e-6)


def test_properties():
  z, features, _ = _data(2)
  cfg0 = vf_loss.VFLossConfig(margin_cos=0.0, margin_distmat=0.0)
  # Aligned latents (a positive multiple of the features) cost nothing; so does any rescaling.
  assert float(vf_loss.vf_loss(jnp.asarray(3.0 * features), features, cfg0)[0]) < 1e-6
  # Margins: a small, uniform misalignment below them costs nothing.
  rotated = features + 0.05 * np.random.default_rng(3).normal(size=features.shape)
  cfg = vf_loss.VFLossConfig(margin_cos=0.5, margin_distmat=0.25)
  assert float(vf_loss.vf_loss(jnp.asarray(rotated), features, cfg0)[0]) > 0
  assert float(vf_loss.vf_loss(jnp.asarray(rotated), features, cfg)[0]) == 0.0
  # Opposite latents: cos term 2 - m1 at every position.
  np.testing.assert_allclose(
      float(vf_loss.cosine_margin_loss(jnp.asarray(-features), features, 0.5)), 1.5, rtol=1e-6)
  # A zero latent vector somewhere: finite loss and gradient (F.normalize's eps, guarded sqrt).
  z[0, 0, 0] = 0.0
  kernel = vf_loss.init_projection(jax.random.key(0), C, D)
  g = jax.grad(lambda z: vf_loss.vf_loss(vf_loss.project(kernel, z), features, cfg0)[0])(z)
  assert np.isfinite(np.asarray(g)).all()
  with pytest.raises(ValueError, match="same"):
    vf_loss.vf_loss(jnp.zeros((1, 2, 2, D)), jnp.zeros((1, 2, 3, D)), cfg0)


def test_projection_init_is_torch_conv_default():
  kernel = np.asarray(vf_loss.init_projection(jax.random.key(0), 32, 1024))
  conv = torch.nn.Conv2d(32, 1024, 1, bias=False)  # kaiming_uniform(a=sqrt(5)).
  torch_kernel = conv.weight.detach()
  bound = float(torch_kernel.abs().max())
  assert kernel.shape == (32, 1024) and kernel.dtype == np.float32
  assert np.abs(kernel).max() <= 32 ** -0.5 and bound <= 32 ** -0.5
  np.testing.assert_allclose(np.abs(kernel).max(), bound, rtol=1e-3)
  np.testing.assert_allclose(kernel.std(), float(torch_kernel.std()), rtol=2e-2)
