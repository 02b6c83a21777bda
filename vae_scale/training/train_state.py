"""The train state (one checkpointed pytree) and the static parts of a step, built from a config."""

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

from vae_scale import models
from vae_scale.models import AutoencoderConfig
from vae_scale.models import AutoencoderKL
from vae_scale.models import DiscriminatorConfig
from vae_scale.models import NLayerDiscriminator
from vae_scale.training import metrics
from vae_scale.training import optim

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
