"""The diffusability terms inside a train step: VA-VAE's VF loss and EQ-VAE's transformed steps.

The pure pieces are `vf_loss` (the loss, the projection, the adaptive weight) and `equivariance`
(the transforms and their draw); this module wires them into the step (`steps`, `accumulate`):

* `forward`: the autoencoder's forward pass of a step, seen through a `View`: the plain step, an
  EQ-VAE tau step (decode tau(z), compare with tau(x)) or a low-resolution step (encode and
  reconstruct the down-scaled image). With the VF loss on it also keeps the input of the encoder's
  conv_out and the decoder's VJP, for the adaptive weight.
* `vf_term`: LightningDiT's adaptive_weight * vf, with the weight ||d nll / dW|| / (||d vf / dW||
  + 1e-4) at W = encoder.conv_out's kernel, nll the step's reconstruction term. d nll / dz comes
  from the VJP of the decoder pass the loss already made (one extra decoder backward to its input,
  as LightningDiT's torch.autograd.grad(nll, last_layer) pays), then both gradients go through
  the encoder's last conv, quant_conv and the sampling by one VJP.
* `view_at`: EQ-VAE replaces the whole step (its loss, the discriminator's update, the metrics) by
  one on transformed images. Each view (plain, tau or low-resolution, per scale;
  `equivariance.View`) is a static part of the step, so its own compiled program; the draw is a
  pure function of the step's key (fold_in of a constant, `transform_of`), so the step's other
  draws are unchanged and a resumed run draws the same views. The loop computes the same draw on
  the host to pick the program; the step draws its rotation itself.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vae_scale.models import dinov2
from vae_scale.models.autoencoder import DiagonalGaussian
from vae_scale.training import equivariance
from vae_scale.training import vf_loss
from vae_scale.training.train_state import StepConfig

Array = jax.Array
EQ_SALT = 0x4551  # fold_in constant of the step key that draws EQ-VAE's transform.


def transform_of(step_key: Array, cfg: equivariance.EquivarianceConfig
                 ) -> equivariance.Transform:
  """The EQ-VAE draw of a train step, a pure function of the step's key (fold_in of EQ_SALT)."""
  return equivariance.sample_transform(jax.random.fold_in(step_key, EQ_SALT), cfg)


@functools.partial(jax.jit, static_argnums=2)
def _host_draw(rng: Array, step: Array, cfg: equivariance.EquivarianceConfig
               ) -> equivariance.Transform:
  return transform_of(jax.random.fold_in(jax.random.wrap_key_data(rng), step), cfg)


def _host_device() -> Any:
  """The CPU, where tiny host-side draws belong; None (the default device) when JAX_PLATFORMS
  leaves it out. jax.random's draws are the same on every backend."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return None


def view_at(cfg: equivariance.EquivarianceConfig, rng: np.ndarray, step: int
            ) -> equivariance.View:
  """The view of train step `step` of a run whose TrainState.rng is `rng` (on the host): the
  draw the step itself makes from its key (`steps.train_step`), computed on the CPU.

  The loop picks the step's compiled program with it (one per view, like the adversarial
  variant): a lax.switch over the views inside one program would run ~12x slower on XLA:CPU
  (BENCHMARKS.md), and every view has its own shapes anyway.
  """
  with jax.default_device(_host_device()):
    t = _host_draw(np.asarray(rng, np.uint32), np.int32(step), cfg)
  return equivariance.view_of(jax.device_get(t), cfg)


def posterior_noise(cfg: StepConfig, params: Any, x: Array, key: Array) -> Array:
  """The standard-normal draw of the posterior sample of `x` [B, h, w, z_channels] float32: what
  `DiagonalGaussian.sample(key)` draws, so z = mean + std * noise is that sample."""
  latent = jax.eval_shape(lambda: nnx.merge(cfg.graphdef, params).encode(x)).mean
  return jax.random.normal(key, latent.shape, jnp.float32)


class Forward(NamedTuple):
  """One forward pass of a step.

  Attributes:
    recon: the decoded images [B, H', W', 3] float32 (of tau(z) in a tau view).
    post: q(z | the encoder's input), arrays [B, h, w, c].
    h: the input of the decoder's conv_out (for LDM's adaptive weight).
    target: what `recon` is compared with: the encoder's input, or tau of it.
    z: the posterior sample [B, h, w, c] (before tau); noise: its standard-normal draw.
    enc_h: the input of the encoder's conv_out (VF loss on), else None.
    decode_vjp: the VJP of z -> (recon, h) at this pass (VF loss on), else None.
  """

  recon: Array
  post: DiagonalGaussian
  h: Array
  target: Array
  z: Array
  noise: Array
  enc_h: Array | None = None
  decode_vjp: Callable[..., Any] | None = None


def forward(cfg: StepConfig, params: Any, x: Array, noise: Array, dropout_rng: Array, *,
            view: equivariance.View = equivariance.PLAIN_VIEW, rotation: Array | int = 0,
            with_vjp: bool = False) -> Forward:
  """The autoencoder's pass of a step on `x` (the view's input, [B, H, W, 3] in [-1, 1]).

  The plain view is `AutoencoderKL.forward_with_features(x, key, noise=noise)` op for op.
  `with_vjp` (the VF loss) also keeps the encoder's conv_out input and the decoder's VJP; its
  decoder draws dropout from its own key (dropout is 0 in VA-VAE's recipe).
  """
  deterministic = cfg.dropout == 0
  model = nnx.merge(cfg.graphdef, params)
  rngs = nnx.Rngs(dropout=dropout_rng)
  enc_h = None
  if with_vjp:
    enc_h = model.encoder.features(x, deterministic, rngs)
    post = model.posterior(model.encoder.conv_out(enc_h))
  else:
    post = model.encode(x, deterministic, rngs)
  z = post.mean + post.std * noise
  z_dec, target = view.pair(z, x, rotation)

  def decode(latents: Array, m: Any, r: nnx.Rngs) -> tuple[Array, Array]:
    h = m.decoder.features(m.post_quant_conv(latents.astype(m.config.dtype)), deterministic, r)
    return m.decoder.conv_out(h).astype(jnp.float32), h

  if not with_vjp:
    recon, h = decode(z_dec, model, rngs)
    return Forward(recon, post, h, target, z, noise)
  # Merged inside: the VJP's trace must own the modules it runs.
  (recon, h), decode_vjp = jax.vjp(
      lambda latents: decode(latents, nnx.merge(cfg.graphdef, params),
                             nnx.Rngs(dropout=jax.random.fold_in(dropout_rng, 1))), z_dec)
  return Forward(recon, post, h, target, z, noise, enc_h, decode_vjp)


def dinov2_targets(cfg: StepConfig, dinov2_params: Any, x: Array, grid: tuple[int, int]
                   ) -> Array:
  """DINOv2's patch features of `x` [B, H, W, 3] on the latent `grid`: [B, h, w, D] float32, no
  gradient (LightningDiT's preprocessing, `dinov2.preprocess`)."""
  if dinov2_params is None or cfg.dinov2_cfg is None:
    raise ValueError("loss.vf_weight > 0 needs the DINOv2 params and architecture "
                     "(frozen_weights.load_vf_dinov2(config))")
  pixels = dinov2.preprocess(x, grid, patch_size=cfg.dinov2_cfg.patch_size,
                             normalize=cfg.vf_normalize)
  out = dinov2.dinov2_features(dinov2_params, cfg.dinov2_cfg, pixels,
                               dtype=jnp.dtype(cfg.lpips_dtype))
  return jax.lax.stop_gradient(out.patches)


def encoder_last_layer_grads(cfg: StepConfig, params: Any, vf_proj: Array, fwd: Forward,
                             features: Array, rec_fn: Callable[[Array], Array]
                             ) -> tuple[Array, Array]:
  """(d nll / dW, d vf / dW) at W = the encoder's conv_out kernel, nll = rec_fn(recon)."""
  sg = jax.lax.stop_gradient
  frozen = sg(params)
  conv = frozen["encoder"]["conv_out"]

  def sample_of(kernel: Array) -> Array:  # W -> conv_out -> quant_conv -> the same sample.
    tree = {**frozen, "encoder": {**frozen["encoder"], "conv_out": {**conv, "kernel": kernel}}}
    model = nnx.merge(cfg.graphdef, tree)
    post = model.posterior(model.encoder.conv_out(sg(fwd.enc_h)))
    return post.mean + post.std * sg(fwd.noise)

  _, sample_vjp = jax.vjp(sample_of, conv["kernel"])
  d_recon = jax.grad(rec_fn)(sg(fwd.recon))
  d_z_nll = fwd.decode_vjp((d_recon, jnp.zeros_like(fwd.h)))[0]
  d_z_vf = jax.grad(lambda z: vf_loss.vf_loss(vf_loss.project(sg(vf_proj), z), features,
                                              cfg.vf)[0])(sg(fwd.z))
  return sample_vjp(sg(d_z_nll).astype(fwd.z.dtype))[0], sample_vjp(d_z_vf)[0]


def vf_term(cfg: StepConfig, params: Any, vf_proj: Array, fwd: Forward, features: Array,
            rec_fn: Callable[[Array], Array]) -> tuple[Array, dict[str, Array]]:
  """LightningDiT's weight * vf of a forward pass (the plain view).

  Args:
    cfg: the step (cfg.vf set).
    params: the autoencoder params (the adaptive weight's W is read from them).
    vf_proj: the projection [c, D] (trained: the loss's gradient reaches it).
    fwd: `forward(..., with_vjp=True)`.
    features: `dinov2_targets` of the same images [B, h, w, D].
    rec_fn: the reconstruction term as a function of the reconstruction (a scalar).

  Returns:
    (weight * vf, {'vf_loss', 'vf_cos', 'vf_distmat', 'vf_weight'}), float32 scalars.
  """
  vf, parts = vf_loss.vf_loss(vf_loss.project(vf_proj, fwd.z), features, cfg.vf)
  weight = jnp.asarray(cfg.vf.weight, jnp.float32)
  if cfg.vf.adaptive:
    nll_grad, vf_grad = encoder_last_layer_grads(cfg, params, vf_proj, fwd, features, rec_fn)
    weight = vf_loss.adaptive_vf_weight(nll_grad, vf_grad, cfg.vf.weight)
  return weight * vf, {"vf_loss": vf, **parts, "vf_weight": weight}
