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
from vae_scale.models.dinov2 import Dinov2Config
from vae_scale.training import metrics
from vae_scale.training import optim
from vae_scale.training import vf_loss
from vae_scale.training.equivariance import EquivarianceConfig
from vae_scale.training.equivariance import PLAIN_VIEW
from vae_scale.training.equivariance import View
from vae_scale.training.vf_loss import VFLossConfig

Array = jax.Array
VF_PROJ = "vf_proj"  # The projection's key in the tree the autoencoder's optimizer updates.
VF_PROJ_SALT = 0x5646  # fold_in constant of the projection's init key (the other keys unchanged).


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
    vf_proj: the VF loss's 1x1 projection [z_channels, DINOv2 width] (loss.vf_weight > 0), or
      None. Trained by the autoencoder's optimizer (its moments live in opt_state under
      'vf_proj'), checkpointed, never exported (export reads `params`).
  """

  step: Array
  rng: Array
  params: Any
  opt_state: Any
  ema_params: Any = None
  disc_params: Any = None
  disc_stats: Any = None
  disc_opt_state: Any = None
  vf_proj: Any = None

  def trainable(self) -> dict[str, Any]:
    """What the autoencoder's optimizer updates: `params`, and the VF projection beside them."""
    return self.params if self.vf_proj is None else {**self.params, VF_PROJ: self.vf_proj}

  def with_trainable(self, tree: dict[str, Any]) -> "TrainState":
    """This state with `params` (and `vf_proj`) taken from a tree shaped like `trainable()`."""
    if self.vf_proj is None:
      return self.replace(params=tree)
    return self.replace(params={k: v for k, v in tree.items() if k != VF_PROJ},
                        vf_proj=tree[VF_PROJ])


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
    lpips_dtype: compute dtype of LPIPS's VGG convs and DINOv2's matmuls (the model's dtype).
    dropout: the model's dropout rate (0: the step runs deterministically).
    ema_decay: decay of the parameter EMA (0: no EMA).
    z_channels: latent channels (for the per-channel KL metrics).
    disc_graphdef, disc_tx: the discriminator's GraphDef and optimizer (None without one).
    disc_weight, disc_factor, disc_loss: LDM's adaptive-weight multiplier, the factor once the
      discriminator is on, and 'hinge' | 'vanilla'.
    adversarial: this variant runs the discriminator (steps >= disc.start_step).
    vf: the VF loss's settings (loss.vf_weight > 0), or None; dinov2_cfg: the architecture of the
      DINOv2 whose params the step is given (position antialias as loss.vf_pos_antialias);
      vf_normalize: 'none' | 'imagenet' (`dinov2.preprocess`).
    equivariance: EQ-VAE's transform distribution (loss.equivariance_weight > 0), or None;
      equivariance_weight: multiplies the reconstruction term of its tau steps.
    view: the EQ-VAE view this variant of the step computes (`equivariance.View`; PLAIN without
      the term): each view is its own compiled step, picked on the host (`diffusability.view_at`).
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
  vf: VFLossConfig | None = None
  dinov2_cfg: Dinov2Config | None = None
  vf_normalize: str = "none"
  equivariance: EquivarianceConfig | None = None
  equivariance_weight: float = 0.0
  view: View = PLAIN_VIEW

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                  tx: optax.GradientTransformation, schedule: optax.Schedule,
                  disc_graphdef: nnx.GraphDef | None = None,
                  disc_tx: optax.GradientTransformation | None = None,
                  dinov2_cfg: Dinov2Config | None = None) -> "StepConfig":
    """The step of `config`; `dinov2_cfg`: the loaded DINOv2's architecture (VF loss on)."""
    z, loss = config.model.z_channels, config.loss
    vf = VFLossConfig.from_config(config) if loss.vf_weight > 0 else None
    eq = (EquivarianceConfig.from_config(config) if loss.equivariance_weight > 0 else None)
    if dinov2_cfg is not None:
      dinov2_cfg = dataclasses.replace(dinov2_cfg, pos_antialias=bool(loss.vf_pos_antialias))
    return cls(graphdef=graphdef, tx=tx, schedule=schedule,
               metrics_cls=metrics.collection(train_metric_names(
                   z, perceptual=loss.perceptual_weight > 0, vf=vf is not None,
                   equivariant=eq is not None)),
               l1_weight=config.loss.l1_weight, ssim_weight=config.loss.ssim_weight,
               kl_weight=config.loss.kl_weight, kl_warmup_steps=config.loss.kl_warmup_steps,
               dropout=config.model.dropout, ema_decay=config.ema_decay, z_channels=z,
               disc_graphdef=disc_graphdef, disc_tx=disc_tx, disc_weight=config.disc.weight,
               disc_factor=config.disc.factor, disc_loss=config.disc.loss,
               l2_weight=config.loss.l2_weight, perceptual_weight=config.loss.perceptual_weight,
               reduction=config.loss.reduction, lpips_dtype=config.model.dtype,
               grad_accum_steps=int(config.optimizer.get("grad_accum_steps", 1)),
               vf=vf, dinov2_cfg=dinov2_cfg, vf_normalize=loss.vf_normalize, equivariance=eq,
               equivariance_weight=float(loss.equivariance_weight))


ADVERSARIAL_METRICS = ["g_loss", "d_loss", "d_weight", "disc_factor", "logits_real",
                       "logits_fake", "disc_accuracy"]
VF_METRICS = ["vf_loss", "vf_cos", "vf_distmat", "vf_weight"]
# The share of steps that were tau steps / low-resolution steps (1 or 0 per step, averaged).
EQUIVARIANCE_METRICS = ["eq_tau_steps", "eq_low_res_steps"]


def train_metric_names(z_channels: int, perceptual: bool = False, vf: bool = False,
                       equivariant: bool = False) -> list[str]:
  """The train step's metrics; `lpips`, the VF and the EQ ones only with their terms."""
  names = ["loss", "l1", "l2", "ssim_loss", "kl", "kl_weight", "rec_loss", "grad_norm",
           "learning_rate", "psnr", "ssim", "nonfinite_skipped", "latent_std"]
  names += ["lpips"] if perceptual else []
  names += VF_METRICS if vf else []
  names += EQUIVARIANCE_METRICS if equivariant else []
  return names + ADVERSARIAL_METRICS + [f"kl_channel_{c}" for c in range(z_channels)]


def init_state(rng: Array, *, model_cfg, tx: optax.GradientTransformation, ema: bool,
               disc_cfg=None, disc_tx: optax.GradientTransformation | None = None,
               vf_feature_dim: int = 0) -> TrainState:
  """Builds models and optimizer states. Run under jit(out_shardings=...) to be born sharded.

  `vf_feature_dim` > 0 adds the VF projection [z_channels, vf_feature_dim] (PyTorch's Conv2d
  init), drawn from its own fold_in of `rng` so the other parts' draws do not change.
  """
  init_rng, train_rng, disc_rng = jax.random.split(rng, 3)
  model = AutoencoderKL(model_cfg, rngs=nnx.Rngs(params=init_rng))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  vf_proj = (vf_loss.init_projection(jax.random.fold_in(rng, VF_PROJ_SALT), model_cfg.z_channels,
                                     vf_feature_dim) if vf_feature_dim else None)
  state = TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(train_rng),
                     params=params, opt_state=None,
                     ema_params=jax.tree.map(jnp.copy, params) if ema else None, vf_proj=vf_proj)
  state = state.replace(opt_state=tx.init(state.trainable()))
  if disc_cfg is not None:
    disc = NLayerDiscriminator(disc_cfg, rngs=nnx.Rngs(params=disc_rng))
    disc_params = nnx.to_pure_dict(nnx.state(disc, nnx.Param))
    state = state.replace(disc_params=disc_params,
                          disc_stats=nnx.to_pure_dict(nnx.state(disc, nnx.BatchStat)),
                          disc_opt_state=disc_tx.init(disc_params))
  return state


def build(config: ml_collections.ConfigDict, *, frozen: Any = None, with_disc: bool | None = None,
          dinov2_cfg: Dinov2Config | None = None
          ) -> tuple[StepConfig, Callable[[Array], TrainState]]:
  """The static step parts and the init function (root key -> TrainState) of a run config.

  Args:
    config: the run config.
    frozen: optional pytree of bools marking frozen autoencoder parameters (see optim).
    with_disc: build the discriminator and its optimizer (default: config.disc.enabled).
    dinov2_cfg: the DINOv2 architecture of loss.vf_weights (`frozen_weights.load_vf_dinov2`);
      the step of a config with the VF loss needs it, its state's shapes do not.
  Returns:
    (StepConfig with adversarial=False, init function to jit with out_shardings).
  """
  with_disc = config.disc.enabled if with_disc is None else with_disc
  model_cfg = AutoencoderConfig.from_config(config)
  vf_dim = int(config.loss.vf_feature_dim) if config.loss.vf_weight > 0 else 0
  if frozen is not None and vf_dim:
    frozen = {**frozen, VF_PROJ: False}  # The projection trains with a frozen encoder too.
  tx, schedule = optim.create_optimizer(config.optimizer, config.num_train_steps, frozen)
  graphdef = models.autoencoder_graphdef(model_cfg)
  disc_cfg = disc_tx = disc_graphdef = None
  if with_disc:
    disc_cfg = DiscriminatorConfig.from_config(config)
    disc_tx = optim.create_disc_optimizer(config.disc)
    disc_graphdef = models.discriminator_graphdef(disc_cfg)
  step_cfg = StepConfig.from_config(config, graphdef, tx, schedule, disc_graphdef, disc_tx,
                                    dinov2_cfg)
  init = functools.partial(init_state, model_cfg=model_cfg, tx=tx, ema=config.ema_decay > 0,
                           disc_cfg=disc_cfg, disc_tx=disc_tx, vf_feature_dim=vf_dim)
  return step_cfg, init
