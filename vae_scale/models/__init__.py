"""Flax NNX models: the KL autoencoder and the PatchGAN discriminator.

The graph definitions and abstract parameters of a model config live here too: everything that needs
a model's structure without its weights (steps, checkpoint readers, converters) builds it through
these functions, under `nnx.eval_shape`, so nothing is allocated.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from vae_scale.models.autoencoder import AutoencoderConfig
from vae_scale.models.autoencoder import AutoencoderKL
from vae_scale.models.autoencoder import DiagonalGaussian
from vae_scale.models.discriminator import DiscriminatorConfig
from vae_scale.models.discriminator import NLayerDiscriminator

__all__ = ["AutoencoderConfig", "AutoencoderKL", "DiagonalGaussian", "DiscriminatorConfig",
           "NLayerDiscriminator", "Params", "abstract_params", "autoencoder_graphdef",
           "discriminator_graphdef"]

Params = dict  # A pure nested dict (int keys for lists), as nnx.to_pure_dict returns.


def _abstract_autoencoder(model_cfg: AutoencoderConfig) -> AutoencoderKL:
  return nnx.eval_shape(lambda: AutoencoderKL(model_cfg, rngs=nnx.Rngs(0)))


def autoencoder_graphdef(model_cfg: AutoencoderConfig) -> Any:
  """The `nnx.GraphDef` of `AutoencoderKL(model_cfg)`: merge it with params to run the model."""
  return nnx.graphdef(_abstract_autoencoder(model_cfg))


def abstract_params(model_cfg: AutoencoderConfig) -> Params:
  """The params tree of `AutoencoderKL(model_cfg)` as ShapeDtypeStructs (nothing allocated)."""
  return nnx.to_pure_dict(nnx.state(_abstract_autoencoder(model_cfg), nnx.Param))


def discriminator_graphdef(disc_cfg: DiscriminatorConfig) -> Any:
  """The `nnx.GraphDef` of `NLayerDiscriminator(disc_cfg)`."""
  return nnx.graphdef(nnx.eval_shape(lambda: NLayerDiscriminator(disc_cfg, rngs=nnx.Rngs(0))))
