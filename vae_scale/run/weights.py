"""Autoencoder weights from anywhere vae_scale reads them, and params directories.

Sources: a diffusers `AutoencoderKL` folder (or a pipeline folder with `vae/`), an original LDM / SD
`.safetensors` (VAE-only or a full SD checkpoint), a diffusers-named `.safetensors`, a params
directory written by `python -m vae_scale.convert import`, or a run workdir (its latest checkpoint).
Whatever the source, `load_params` returns vae_scale params checked name by name and shape by shape
against the architecture they must fit. It sits in run/ because a run's workdir is one of the
sources (`run.checkpoints`); the file formats themselves are interop's.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vae_scale import models
from vae_scale.errors import ConversionError
from vae_scale.interop import diffusers_config
from vae_scale.interop import names
from vae_scale.interop import safetensors_io
from vae_scale.models import AutoencoderConfig
from vae_scale.run import checkpoints
from vae_scale.run import state_tree

Params = dict
PARAMS_METADATA = "vae_scale_params.json"  # Marks a params directory written by `import`.
PARAMS_ITEM = "params"  # The Orbax checkpoint inside a params directory.
_MAX_LISTED = 10


def from_state_dict(state_dict: dict[str, np.ndarray], model_cfg: AutoencoderConfig, *,
                    source: str = "state dict", original_names: dict[str, str] | None = None
                    ) -> Params:
  """A diffusers-named state dict (torch layouts) -> vae_scale params (float32 numpy).

  Args:
    state_dict: {diffusers key: array}; LDM 1x1-conv attention weights are accepted too.
    model_cfg: the architecture the weights must fit exactly.
    source: what the weights came from, for the error message.
    original_names: the file's own name of each key (LDM), for the error message.

  Raises:
    ConversionError: names or shapes don't match `model_cfg`; lists the first mismatches.
  """
  original_names = original_names or {}
  show = lambda k: f"{k} (file: {original_names[k]})" if k in original_names else k
  expected = {names.diffusers_name(path): (path, tuple(a.shape))
              for path, a in names.model_order(names.flatten(models.abstract_params(model_cfg)))}
  problems = []
  for key, (path, shape) in expected.items():
    if key not in state_dict:
      problems.append(f"missing    {key}: the config expects shape {list(names.torch_shape(shape))}")
      continue
    got = tuple(np.shape(state_dict[key]))
    if len(shape) == 2 and len(got) > 2 and all(s == 1 for s in got[2:]):
      got = got[:2]
    if got != names.torch_shape(shape):
      problems.append(f"shape      {show(key)}: file has {list(got)}, the config expects "
                      f"{list(names.torch_shape(shape))}")
  problems.extend(f"unexpected {show(k)} {list(np.shape(v))}" for k, v in state_dict.items()
                  if k not in expected)
  if problems:
    listed = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise ConversionError(
        f"{source}: {len(problems)} tensor(s) don't match the model config "
        f"({diffusers_config.describe(model_cfg)}). First mismatches:\n  {listed}{more}\nCheck that "
        "config.model (and image_size for attention) describes this checkpoint's architecture.")
  items = []
  for key, (path, shape) in expected.items():
    value = names.from_torch_layout(state_dict[key], len(shape))
    items.append((path, value.astype(np.float32)))
  return names.unflatten(items)


def _diffusers_dir(path: epath.Path) -> epath.Path | None:
  for d in (path, path / "vae"):  # A VAE folder, or a whole pipeline with a vae/ subfolder.
    if (d / safetensors_io.DIFFUSERS_CONFIG).exists():
      return d
  return None


def describe_source(path: str) -> str:
  """'params' | 'run' | 'diffusers' | 'safetensors' for a path `load_params` accepts."""
  p = epath.Path(path)
  if not p.exists():
    raise ConversionError(f"{path} does not exist")
  if p.is_dir():
    if (p / PARAMS_METADATA).exists():
      return "params"
    if (p / "checkpoints").exists():
      return "run"
    if _diffusers_dir(p) is not None:
      return "diffusers"
    raise ConversionError(
        f"{path} is neither a diffusers AutoencoderKL folder (config.json + {safetensors_io.DIFFUSERS_WEIGHTS}), "
        f"a params directory written by `python -m vae_scale.convert import`, nor a run workdir")
  if str(p).lower().endswith(safetensors_io.PICKLE_SUFFIXES):
    raise safetensors_io.refuse_pickle(str(p))
  return "safetensors"


def read_params_metadata(path: str) -> dict[str, Any]:
  """The JSON a params directory carries: model config, scaling/shift factor, source."""
  return json.loads((epath.Path(path) / PARAMS_METADATA).read_text())


def _read_diffusers(path: epath.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  d = _diffusers_dir(path)
  config_json = json.loads((d / safetensors_io.DIFFUSERS_CONFIG).read_text())
  weights = d / safetensors_io.DIFFUSERS_WEIGHTS
  if not weights.exists():
    pickled = [f.name for f in d.iterdir() if f.name.lower().endswith(safetensors_io.PICKLE_SUFFIXES)]
    if pickled:
      raise safetensors_io.refuse_pickle(str(d / pickled[0]))
    raise ConversionError(f"{d} has {safetensors_io.DIFFUSERS_CONFIG} but no {safetensors_io.DIFFUSERS_WEIGHTS}")
  return safetensors_io.read_safetensors(str(weights)), config_json


def source_config(path: str, *, norm_groups: int = 32, resolution: int = 256
                  ) -> tuple[AutoencoderConfig, dict[str, Any]]:
  """The architecture stored with (or read off) weights at `path`, and their latent scaling.

  Returns:
    (model config, {'scaling_factor': float|None, 'shift_factor': float|None}).
  """
  kind = describe_source(path)
  p = epath.Path(path)
  if kind == "params":
    meta = read_params_metadata(path)
    return diffusers_config.model_cfg_from_json(meta["model"]), {k: meta.get(k) for k in ("scaling_factor",
                                                                          "shift_factor")}
  if kind == "diffusers":
    config_json = json.loads((_diffusers_dir(p) / safetensors_io.DIFFUSERS_CONFIG).read_text())
    return diffusers_config.autoencoder_config_from_diffusers(config_json), {
        "scaling_factor": config_json.get("scaling_factor", diffusers_config.SD_SCALING_FACTOR),
        "shift_factor": config_json.get("shift_factor")}
  if kind == "run":
    raise ConversionError(f"{path} is a run workdir; its architecture is in the run's config "
                          "(pass --config)")
  sd, _, _ = names.normalize_state_dict(safetensors_io.read_safetensors(path))
  return diffusers_config.infer_autoencoder_config(sd, norm_groups=norm_groups, resolution=resolution), {
      "scaling_factor": None, "shift_factor": None}


def load_params(path: str, model_cfg: AutoencoderConfig | None = None) -> Params:
  """Loads autoencoder weights from anywhere vae_scale can read them, as vae_scale params.

  Args:
    path: a diffusers `AutoencoderKL` folder (or a pipeline folder with `vae/`), an original LDM /
      SD `.safetensors` (VAE-only or a full SD checkpoint), a diffusers-named `.safetensors`, a
      params directory written by `python -m vae_scale.convert import`, or a run workdir (its
      latest checkpoint, EMA weights when present).
    model_cfg: the architecture they must fit; None = the one stored with (or read off) them.
  Returns:
    A pure nested dict of float32 numpy arrays with exactly the names and shapes of
    `nnx.state(AutoencoderKL(model_cfg), nnx.Param)`.
  Raises:
    ConversionError: pickle files, unreadable files, or names/shapes that don't match.
  """
  kind = describe_source(path)
  if model_cfg is None and kind != "run":
    model_cfg, _ = source_config(path)
  if kind == "run":
    if model_cfg is None:
      raise ConversionError(f"{path} is a run workdir: pass the model config of its run")
    params, _, _ = checkpoints.read_params(path, model_cfg)
    return params
  if kind == "params":
    return _restore_params_dir(path, model_cfg)
  if kind == "diffusers":
    sd, _ = _read_diffusers(epath.Path(path))
    source = str(_diffusers_dir(epath.Path(path)) / safetensors_io.DIFFUSERS_WEIGHTS)
  else:
    sd, source = safetensors_io.read_safetensors(path), path
  sd, file_names, fmt = names.normalize_state_dict(sd)
  try:
    return from_state_dict(sd, model_cfg, source=f"{source} ({fmt} names)",
                           original_names=file_names)
  except ConversionError as e:
    try:
      found = diffusers_config.infer_autoencoder_config(
          sd, norm_groups=model_cfg.norm_groups, resolution=model_cfg.resolution)
    except ConversionError:
      raise e from None
    flags = " ".join(diffusers_config.config_overrides(found))
    raise ConversionError(f"{e}\nThese weights look like: {flags}") from None


def save_params_dir(params: Params, out_dir: str, model_cfg: AutoencoderConfig, *,
                    source: str = "", scaling_factor: float | None = None,
                    shift_factor: float | None = None) -> None:
  """Writes params as a standalone Orbax checkpoint plus a JSON with their architecture."""
  out = epath.Path(out_dir)
  if (out / PARAMS_ITEM).exists():
    raise ConversionError(f"{out / PARAMS_ITEM} already exists; choose a new --out")
  out.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(out / PARAMS_ITEM, params)
    ckptr.wait_until_finished()
  meta = {"format": "vae_scale.params", "version": 1,
          "model": diffusers_config.model_cfg_to_json(model_cfg),
          "scaling_factor": scaling_factor, "shift_factor": shift_factor, "source": source}
  (out / PARAMS_METADATA).write_text(json.dumps(meta, indent=2) + "\n")


def _restore_params_dir(path: str, model_cfg: AutoencoderConfig) -> Params:
  item = epath.Path(path) / PARAMS_ITEM
  abstract = models.abstract_params(model_cfg)
  md = ocp.PyTreeCheckpointHandler().metadata(item)
  state_tree.check_shapes(getattr(md, "tree", md), abstract, str(item))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(item, abstract)
  return jax_to_numpy(params)


def jax_to_numpy(tree: Params) -> Params:
  """A params tree of device arrays as numpy arrays (same nesting)."""
  return {k: jax_to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def latent_factors(latents_path: str) -> tuple[float, float]:
  """(scale_factor, shift_factor) from `encode`'s metadata.json (or the folder holding it)."""
  p = epath.Path(latents_path)
  meta = json.loads((p / "metadata.json" if p.is_dir() else p).read_text())
  return float(meta["scale_factor"]), float(meta["shift_factor"])


def load_weights(config: ml_collections.ConfigDict, workdir: str | None, params_path: str | None,
                 step: int | str | None, weights: str, sharding_: Any = None
                 ) -> tuple[dict, int, str]:
  """The autoencoder params to evaluate or encode with: imported weights at `params_path`, or a
  run's checkpoint (EMA weights when it keeps them and `weights` is 'auto').

  Returns:
    (params, step, 'imported' | 'ema' | 'params').
  """
  model_cfg = AutoencoderConfig.from_config(config)
  if params_path:
    params = load_params(params_path, model_cfg)
    return (jax.device_put(params, sharding_) if sharding_ is not None else params,
            int(step) if str(step or "").isdigit() else 0, "imported")
  if not workdir:
    raise ConversionError("needs a run --workdir or --params")
  return checkpoints.read_params(workdir, model_cfg, step=step, weights=weights,
                                   sharding=sharding_)
