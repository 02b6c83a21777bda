"""The pure, mesh-agnostic train step over a pytree TrainState (jitted with shardings by `programs`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from vae_scale import losses
from vae_scale import models
from vae_scale import metrics
from vae_scale import optim
from vae_scale.models import AutoencoderConfig
from vae_scale.models import AutoencoderKL
from vae_scale.models import DiscriminatorConfig
from vae_scale.models import NLayerDiscriminator
from vae_scale.models import lpips

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: checkpointed as one pytree.

  Attributes:
    step: completed train steps (int32 scalar).
    rng: raw data of the run's root key (uint32 [2]); step s uses fold_in(rng, s).
    params: autoencoder parameters as a pure nested dict (diffusers-style names).
    opt_state: optax state of the autoencoder optimizer.
    ema_params: exponential moving average of `params`, or None when EMA is off.
    disc_params, disc_stats, disc_opt_state: the discriminator's parameters, batch-norm
      statistics and optimizer state, or None when the adversarial term is off.
  """

  step: Array
  rng: Array
  params: Any
  opt_state: Any
  ema_params: Any = None
  disc_params: Any = None
  disc_stats: Any = None
  disc_opt_state: Any = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static parts of a step, bound with functools.partial before jit.

  Attributes:
    graphdef: the autoencoder's nnx.GraphDef (merged with the params inside the step).
    tx: the autoencoder's optimizer; schedule: its learning-rate schedule (for the metric).
    metrics_cls: the clu.metrics Collection class the train step returns.
    l1_weight, ssim_weight, l2_weight, perceptual_weight: weights of the L1, (1 - SSIM), squared
      error and LPIPS terms (>= 0; see `losses.reconstruction_loss`).
    kl_weight: weight of the KL term after `kl_warmup_steps` of linear warm-up.
    reduction: 'mean' (per-element means) or 'ldm_sum' (LDM's summed units): `losses.REDUCTIONS`.
    lpips_dtype: compute dtype of LPIPS's VGG convs (the model's dtype).
    dropout: the model's dropout rate (0: the step runs deterministically).
    ema_decay: decay of the parameter EMA (0: no EMA).
    z_channels: latent channels (for the per-channel KL metrics).
    disc_graphdef, disc_tx: the discriminator's GraphDef and optimizer (None without one).
    disc_weight, disc_factor, disc_loss: LDM's adaptive-weight multiplier, the factor once the
      discriminator is on, and 'hinge' | 'vanilla'.
    adversarial: this variant runs the discriminator (steps >= disc.start_step).
  """

  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  metrics_cls: type
  l1_weight: float
  ssim_weight: float
  kl_weight: float
  kl_warmup_steps: int
  dropout: float
  ema_decay: float
  z_channels: int
  disc_graphdef: nnx.GraphDef | None = None
  disc_tx: optax.GradientTransformation | None = None
  disc_weight: float = 0.5
  disc_factor: float = 1.0
  disc_loss: str = "hinge"
  adversarial: bool = False
  l2_weight: float = 0.0
  perceptual_weight: float = 0.0
  reduction: str = "mean"
  lpips_dtype: str = "float32"
  grad_accum_steps: int = 1  # Micro-batches per step (optimizer.grad_accum_steps).

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                  tx: optax.GradientTransformation, schedule: optax.Schedule,
                  disc_graphdef: nnx.GraphDef | None = None,
                  disc_tx: optax.GradientTransformation | None = None) -> "StepConfig":
    z = config.model.z_channels
    return cls(graphdef=graphdef, tx=tx, schedule=schedule,
               metrics_cls=metrics.collection(
                   train_metric_names(z, perceptual=config.loss.perceptual_weight > 0)),
               l1_weight=config.loss.l1_weight, ssim_weight=config.loss.ssim_weight,
               kl_weight=config.loss.kl_weight, kl_warmup_steps=config.loss.kl_warmup_steps,
               dropout=config.model.dropout, ema_decay=config.ema_decay, z_channels=z,
               disc_graphdef=disc_graphdef, disc_tx=disc_tx, disc_weight=config.disc.weight,
               disc_factor=config.disc.factor, disc_loss=config.disc.loss,
               l2_weight=config.loss.l2_weight, perceptual_weight=config.loss.perceptual_weight,
               reduction=config.loss.reduction, lpips_dtype=config.model.dtype,
               grad_accum_steps=int(config.optimizer.get("grad_accum_steps", 1)))


ADVERSARIAL_METRICS = ["g_loss", "d_loss", "d_weight", "disc_factor", "logits_real",
                       "logits_fake", "disc_accuracy"]


def train_metric_names(z_channels: int, perceptual: bool = False) -> list[str]:
  """The train step's metrics; `lpips` only when the loss has the perceptual term."""
  names = ["loss", "l1", "l2", "ssim_loss", "kl", "kl_weight", "rec_loss", "grad_norm",
           "learning_rate", "psnr", "ssim", "nonfinite_skipped", "latent_std"]
  names += ["lpips"] if perceptual else []
  return names + ADVERSARIAL_METRICS + [f"kl_channel_{c}" for c in range(z_channels)]


def init_state(rng: Array, *, model_cfg, tx: optax.GradientTransformation, ema: bool,
               disc_cfg=None, disc_tx: optax.GradientTransformation | None = None) -> TrainState:
  """Builds models and optimizer states. Run under jit(out_shardings=...) to be born sharded."""
  init_rng, train_rng, disc_rng = jax.random.split(rng, 3)
  model = AutoencoderKL(model_cfg, rngs=nnx.Rngs(params=init_rng))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(train_rng),
                     params=params, opt_state=tx.init(params),
                     ema_params=jax.tree.map(jnp.copy, params) if ema else None)
  if disc_cfg is not None:
    disc = NLayerDiscriminator(disc_cfg, rngs=nnx.Rngs(params=disc_rng))
    disc_params = nnx.to_pure_dict(nnx.state(disc, nnx.Param))
    state = state.replace(disc_params=disc_params,
                          disc_stats=nnx.to_pure_dict(nnx.state(disc, nnx.BatchStat)),
                          disc_opt_state=disc_tx.init(disc_params))
  return state


def build(config: ml_collections.ConfigDict, *, frozen: Any = None, with_disc: bool | None = None
          ) -> tuple[StepConfig, Callable[[Array], TrainState]]:
  """The static step parts and the init function (root key -> TrainState) of a run config.

  Args:
    config: the run config.
    frozen: optional pytree of bools marking frozen autoencoder parameters (see optim).
    with_disc: build the discriminator and its optimizer (default: config.disc.enabled).
  Returns:
    (StepConfig with adversarial=False, init function to jit with out_shardings).
  """
  with_disc = config.disc.enabled if with_disc is None else with_disc
  model_cfg = AutoencoderConfig.from_config(config)
  tx, schedule = optim.create_optimizer(config.optimizer, config.num_train_steps, frozen)
  graphdef = models.autoencoder_graphdef(model_cfg)
  disc_cfg = disc_tx = disc_graphdef = None
  if with_disc:
    disc_cfg = DiscriminatorConfig.from_config(config)
    disc_tx = optim.create_disc_optimizer(config.disc)
    disc_graphdef = models.discriminator_graphdef(disc_cfg)
  step_cfg = StepConfig.from_config(config, graphdef, tx, schedule, disc_graphdef, disc_tx)
  init = functools.partial(init_state, model_cfg=model_cfg, tx=tx, ema=config.ema_decay > 0,
                           disc_cfg=disc_cfg, disc_tx=disc_tx)
  return step_cfg, init


def _channel_metrics(prefix: str, per_channel: Array) -> dict[str, Array]:
  return {f"{prefix}_{c}": per_channel[c] for c in range(per_channel.shape[0])}


def _last_conv(h: Array, kernel: Array, bias: Array) -> Array:
  """The decoder's conv_out as a function of its kernel (3x3, stride 1, SAME), float32 out."""
  y = jax.lax.conv_general_dilated(h, kernel.astype(h.dtype), (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return (y + bias.astype(h.dtype)).astype(jnp.float32)


def discriminate(cfg: StepConfig, disc_params: Any, disc_stats: Any, images: Array,
                 train: bool = True) -> tuple[Array, Any]:
  """Patch logits of `images` and the batch statistics after this call."""
  disc = nnx.merge(cfg.disc_graphdef, disc_params, disc_stats)
  logits = disc(images, train=train)
  return logits, nnx.to_pure_dict(nnx.state(disc, nnx.BatchStat))


def reconstruction_fn(cfg: StepConfig, x: Array, lpips_params: Any = None
                      ) -> Callable[[Array], tuple[Array, dict[str, Array]]]:
  """The reconstruction term of the loss as a function of the reconstruction [B, H, W, 3]:
  (rec, terms) of `losses.reconstruction_loss` with the step's weights and LPIPS.

  The loss and LDM's adaptive weight both use this one function, so d_weight is taken on the whole
  reconstruction term (LPIPS included), as taming-transformers does.

  Args:
    cfg: static parts (weights, reduction, LPIPS dtype).
    x: the inputs [B, H, W, 3] in [-1, 1].
    lpips_params: frozen LPIPS-VGG params (`torch_nets.load_lpips_params`); needed when
      cfg.perceptual_weight > 0, otherwise unused.
  """
  perceptual = None
  if cfg.perceptual_weight:
    if lpips_params is None:
      raise ValueError("perceptual_weight > 0 needs the LPIPS params (config.loss.lpips_weights)")
    perceptual = functools.partial(lpips.lpips_distance, lpips_params,
                                   dtype=jnp.dtype(cfg.lpips_dtype))
  return functools.partial(losses.reconstruction_loss, x, l1_weight=cfg.l1_weight,
                           ssim_weight=cfg.ssim_weight, l2_weight=cfg.l2_weight,
                           perceptual_weight=cfg.perceptual_weight, perceptual_fn=perceptual,
                           reduction=cfg.reduction)


def last_layer_grads(cfg: StepConfig, x: Array, h: Array, recon: Array, params: Any,
                     disc_params: Any, disc_stats: Any, lpips_params: Any = None
                     ) -> tuple[Array, Array]:
  """Gradients of the reconstruction term (`reconstruction_fn`) and of the generator loss w.r.t.
  the decoder's last kernel W, as LDM's adaptive weight needs them (through one VJP of the last
  conv)."""
  conv = params["decoder"]["conv_out"]
  _, vjp = jax.vjp(lambda w: _last_conv(h, w, conv["bias"]), conv["kernel"])
  rec_fn = lambda r: reconstruction_fn(cfg, x, lpips_params)(r)[0]
  g_fn = lambda r: losses.generator_loss(discriminate(cfg, disc_params, disc_stats, r)[0])
  rec_grad = vjp(jax.grad(rec_fn)(recon))[0]
  g_grad = vjp(jax.grad(g_fn)(recon))[0]
  return rec_grad, g_grad


def train_step(state: TrainState, batch: dict[str, Array], lpips_params: Any = None, *,
               cfg: StepConfig) -> tuple[TrainState, Any]:
  """One optimizer step of the autoencoder (and, when `cfg.adversarial`, of the discriminator).

  Args:
    state: the train state (donated).
    batch: {'image': [B, H, W, 3] float32 in [-1, 1]}, the global batch.
    lpips_params: frozen LPIPS-VGG params (flat dict of arrays), an argument rather than state: they
      are never trained, checkpointed or given to the optimizer. None when the loss has no LPIPS.
    cfg: static parts.
  Returns:
    (new state, metrics collection of this step).
  """
  x = batch["image"]
  # fold_in the step: a resumed run draws exactly the numbers an uninterrupted one would.
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  sample_rng, dropout_rng = jax.random.split(step_rng)
  kl_weight = losses.kl_weight_at(state.step, cfg.kl_weight, cfg.kl_warmup_steps)
  disc_factor = jnp.asarray(cfg.disc_factor if cfg.adversarial else 0.0, jnp.float32)

  def loss_fn(params):
    model = nnx.merge(cfg.graphdef, params)
    recon, post, h = model.forward_with_features(x, sample_rng, deterministic=cfg.dropout == 0,
                                                 rngs=nnx.Rngs(dropout=dropout_rng))
    loss, terms = losses.with_kl(*reconstruction_fn(cfg, x, lpips_params)(recon), post,
                                 kl_weight, cfg.reduction)
    adv = dict.fromkeys(["g_loss", "d_weight"], jnp.zeros((), jnp.float32))
    if cfg.adversarial:
      logits_fake, _ = discriminate(cfg, state.disc_params, state.disc_stats, recon)
      g_loss = losses.generator_loss(logits_fake)
      rec_grad, g_grad = last_layer_grads(cfg, x, jax.lax.stop_gradient(h),
                                          jax.lax.stop_gradient(recon), params,
                                          state.disc_params, state.disc_stats, lpips_params)
      d_weight = losses.adaptive_weight(rec_grad, g_grad, cfg.disc_weight)
      loss = loss + d_weight * disc_factor * g_loss
      adv = {"g_loss": g_loss, "d_weight": d_weight}
    return loss, (terms, adv, recon, post)

  if cfg.grad_accum_steps > 1:  # k micro-batches inside this one step (`accumulate`).
    from vae_scale import accumulate  # pylint: disable=g-import-not-at-top  (it imports steps)
    return accumulate.accumulated_step(state, x, lpips_params, step_rng, kl_weight, disc_factor,
                                       cfg=cfg)
  (loss, (terms, adv, recon, post)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state, opt_state = apply_update(state, grads, cfg)
  disc_out = dict.fromkeys(["d_loss", "logits_real", "logits_fake", "disc_accuracy"],
                           jnp.zeros((), jnp.float32))
  if cfg.adversarial:
    d_loss, (stats, lr, lf), d_grads = discriminator_grads(cfg, state.disc_params,
                                                           state.disc_stats, x, recon, disc_factor)
    new_state, disc_out = apply_disc_update(state, new_state, d_loss, stats, lr, lf, d_grads, cfg)
  return new_state, collect_metrics(cfg, state, loss, grads, opt_state, terms, adv, disc_out,
                                    image_metrics(x, recon, post), disc_factor)


def apply_update(state: TrainState, grads: Any, cfg: StepConfig) -> tuple[TrainState, Any]:
  """The optimizer step of the autoencoder (and its EMA) with `grads`; returns (state, opt_state)."""
  updates, opt_state = cfg.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    # Skipped (non-finite) steps leave params unchanged, so the average stays finite too.
    ema_params = optax.incremental_update(params, ema_params, step_size=1.0 - cfg.ema_decay)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema_params), opt_state


def discriminator_grads(cfg: StepConfig, disc_params: Any, disc_stats: Any, x: Array, recon: Array,
                        disc_factor: Array) -> tuple[Array, tuple[Any, Array, Array], Any]:
  """The discriminator's loss on real `x` and fake `recon` [B, H, W, 3], its gradients and the
  batch statistics after both passes: (d_loss, (stats, logits_real, logits_fake), grads)."""
  fake = jax.lax.stop_gradient(recon)

  def d_loss_fn(params):
    # Real and fake pass separately, as in taming-transformers (separate batch statistics).
    logits_real, stats = discriminate(cfg, params, disc_stats, x)
    logits_fake, stats = discriminate(cfg, params, stats, fake)
    d_loss = disc_factor * losses.D_LOSSES[cfg.disc_loss](logits_real, logits_fake)
    return d_loss, (stats, logits_real, logits_fake)

  (d_loss, aux), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
  return d_loss, aux, grads


def apply_disc_update(state: TrainState, new_state: TrainState, d_loss: Array, stats: Any,
                      logits_real: Array, logits_fake: Array, d_grads: Any,
                      cfg: StepConfig) -> tuple[TrainState, dict[str, Array]]:
  """The discriminator's optimizer step; returns the state and its metrics."""
  d_updates, d_opt = cfg.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
  new_state = new_state.replace(disc_params=optax.apply_updates(state.disc_params, d_updates),
                                disc_stats=stats, disc_opt_state=d_opt)
  acc = 0.5 * (jnp.mean((logits_real > 0).astype(jnp.float32)) +
               jnp.mean((logits_fake < 0).astype(jnp.float32)))
  return new_state, {"d_loss": d_loss, "logits_real": jnp.mean(logits_real),
                     "logits_fake": jnp.mean(logits_fake), "disc_accuracy": acc}


def image_metrics(x: Array, recon: Array, post: Any) -> dict[str, Array]:
  """PSNR and SSIM (clipped reconstructions), the latent std and the KL per latent channel."""
  return {"psnr": jnp.mean(losses.psnr(x, recon)), "ssim": jnp.mean(losses.ssim_metric(x, recon)),
          "latent_std": jnp.std(post.mean),
          **_channel_metrics("kl_channel", losses.kl_per_channel(post))}


def collect_metrics(cfg: StepConfig, state: TrainState, loss: Array, grads: Any, opt_state: Any,
                    terms: dict[str, Array], adv: dict[str, Array], disc_out: dict[str, Array],
                    quality: dict[str, Array], disc_factor: Array) -> Any:
  """The step's metrics collection (`train_metric_names`)."""
  outputs = dict(terms)
  outputs.update(adv, **disc_out, **quality)
  outputs.update(
      loss=loss, grad_norm=optax.global_norm(grads), learning_rate=cfg.schedule(state.step),
      nonfinite_skipped=1.0 - jnp.asarray(opt_state.last_finite, jnp.float32),
      disc_factor=disc_factor)
  names = train_metric_names(cfg.z_channels, perceptual=cfg.perceptual_weight > 0)
  return cfg.metrics_cls.single_from_model_output(**{n: outputs[n] for n in names})
