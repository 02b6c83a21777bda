"""interop.names: diffusers <-> LDM names agree with diffusers' own converter; legacy names load."""

import numpy as np
import pytest

from conftest import assert_trees_equal
from conftest import random_params
from conftest import small_autoencoder_config
from vae_scale.interop import diffusers_config
from vae_scale.interop import names
from vae_scale.run import weights

SMALL = small_autoencoder_config()


def test_ldm_names_agree_with_diffusers_own_converter():
  pytest.importorskip("torch")
  single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
  params = random_params(SMALL)
  ldm = names.to_ldm_state_dict(params)
  config = diffusers_config.diffusers_config_from_autoencoder(SMALL)
  # A full SD checkpoint: the VAE under first_stage_model., plus UNet and loss weights.
  full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
  full["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((2, 2), np.float32)
  theirs = single_file_utils.convert_ldm_vae_checkpoint(full, config)
  ours = names.to_diffusers_state_dict(params)
  assert sorted(theirs) == sorted(ours)
  for k, v in ours.items():
    np.testing.assert_array_equal(np.asarray(theirs[k]).reshape(v.shape), v, err_msg=k)
  full["first_stage_model.loss.logvar"] = np.zeros((), np.float32)
  sd, _, fmt = names.normalize_state_dict(full)
  assert fmt == "ldm"
  assert_trees_equal(weights.from_state_dict(sd, SMALL), params)


def test_legacy_diffusers_attention_names_load():
  params = random_params(SMALL)
  sd = names.to_diffusers_state_dict(params)
  legacy = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
            .replace("to_out.0", "proj_attn"): v for k, v in sd.items()}
  norm, _, fmt = names.normalize_state_dict(legacy)
  assert fmt == "diffusers"
  assert_trees_equal(weights.from_state_dict(norm, SMALL), params)
