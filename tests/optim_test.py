"""optim: which parameters the optimizer updates."""

import jax

from conftest import random_params
from conftest import small_autoencoder_config
from vae_scale.training import optim


def test_trainable_mask_freezes_the_encoder_side():
  mask = optim.trainable_mask(random_params(small_autoencoder_config()), freeze_encoder=True)
  assert not any(jax.tree.leaves(mask["encoder"])) and not any(jax.tree.leaves(mask["quant_conv"]))
  assert all(jax.tree.leaves(mask["decoder"])) and all(jax.tree.leaves(mask["post_quant_conv"]))
  assert all(jax.tree.leaves(optim.trainable_mask(mask, freeze_encoder=False)))
