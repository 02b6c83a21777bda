"""safetensors files in and out (numpy arrays; local or gs://). Pickle-based files are refused.

Unpickling a `.ckpt`/`.bin`/`.pt` can run arbitrary code, so vae_scale never does it: every torch
file it needs is converted to safetensors once, by a command that says how.
"""

from __future__ import annotations

import json
import os

import numpy as np
from etils import epath

from vae_scale.errors import ConversionError
from vae_scale.interop import diffusers_config
from vae_scale.interop import names
from vae_scale.models.frozen_weights import PICKLE_SUFFIXES


def refuse_pickle(path: str) -> ConversionError:
  return ConversionError(
      f"{path} is a pickle-based PyTorch checkpoint; vae_scale never unpickles files (loading "
      "one can run arbitrary code). Convert it to safetensors once, in an environment you trust:\n"
      "  python -c \"import torch, safetensors.torch as st; sd = torch.load('IN.ckpt', "
      "map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
      "st.save_file({k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}, "
      "'OUT.safetensors')\"\n"
      "or, for a diffusers folder: AutoencoderKL.from_pretrained(DIR).save_pretrained(DIR, "
      "safe_serialization=True). Then pass the .safetensors file or the folder.")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (bfloat16 is widened to float32).

  Raises:
    ConversionError: a pickle/zip file or anything that isn't safetensors.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if path.lower().endswith(PICKLE_SUFFIXES):
    raise refuse_pickle(path)
  head = epath.Path(path).open("rb").read(9)
  # A safetensors file starts with an 8-byte header length and then '{'; byte 0 may be anything
  # (0x80 included), so look for a zip (torch.save) or a pickle stream only when that is absent.
  if len(head) < 9 or head[8:9] != b"{":
    if head[:2] == b"PK" or head[:1] == b"\x80":
      raise refuse_pickle(path)
    raise ConversionError(f"{path} is not a safetensors file")
  out = {}
  try:
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        if f.get_slice(key).get_dtype() == "BF16":
          # numpy has no bfloat16: read these through JAX and widen.
          with safe_open(path, framework="flax") as fj:
            out[key] = np.asarray(fj.get_tensor(key), np.float32)
        else:
          out[key] = f.get_tensor(key)
  except Exception as e:  # safetensors raises its own types for corrupt headers.
    raise ConversionError(f"{path} could not be read as safetensors: {e}") from e
  return out


def write_safetensors(tensors: dict[str, np.ndarray], path: str,
                      metadata: dict[str, str] | None = None) -> None:
  """Writes numpy arrays to a .safetensors file (local or gs://)."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  # np.require, not np.ascontiguousarray: that one turns a 0-d scalar into shape (1,).
  data = save({k: np.require(v, requirements='C') for k, v in tensors.items()}, metadata=metadata)
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  epath.Path(path).write_bytes(data)


# --------------------------------------------------------------------------- export

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"


def export_diffusers(params: dict, model_cfg, out_dir: str, *, scaling_factor: float | None = None,
                     shift_factor: float | None = None, dtype: str = "float32") -> None:
  """Writes a folder `diffusers.AutoencoderKL.from_pretrained(out_dir)` loads.

  Args:
    params: vae_scale autoencoder params (numpy), `model_cfg`'s architecture.
    model_cfg: an `AutoencoderConfig`.
    out_dir: the folder (created), local or gs://.
    scaling_factor: the latent scale for config.json (default SD's 0.18215).
    shift_factor: the latent shift for config.json (None: no shift).
    dtype: 'float32' or 'float16' for the stored tensors.
  """
  scale = diffusers_config.SD_SCALING_FACTOR if scaling_factor is None else scaling_factor
  config_json = diffusers_config.diffusers_config_from_autoencoder(
      model_cfg, scaling_factor=scale, shift_factor=shift_factor)
  sd = {k: v.astype(dtype) for k, v in names.to_diffusers_state_dict(params).items()}
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  write_safetensors(sd, str(out / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
  (out / DIFFUSERS_CONFIG).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")


def export_ldm(params: dict, path: str, dtype: str = "float32") -> None:
  """Writes an original-LDM-named VAE `.safetensors` (as SD's `vae-ft-*.safetensors`)."""
  write_safetensors({k: v.astype(dtype) for k, v in names.to_ldm_state_dict(params).items()},
                    path, metadata={"format": "pt"})
