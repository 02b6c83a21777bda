"""DINOv2 weights: a Hugging Face `transformers` folder -> one vae_scale safetensors file.

  python -m vae_scale.convert dinov2 --src=DIR --out=dinov2_vitl14.safetensors

DIR is a transformers DINOv2 checkpoint folder (`config.json` + `model.safetensors`, or shards with
`model.safetensors.index.json`), e.g. a download of facebook/dinov2-large (what LightningDiT's
VA-VAE aligns to) or facebook/dinov2-with-registers-large. Its tensors are read with
safetensors' numpy reader (no torch); a folder holding only `pytorch_model.bin` is refused (never
unpickled). Both the hub's names (`attention.attention.query`, `mlp.weights_in` ...) and
transformers 5's in-memory names (`attention.q_proj`, `mlp.gate_proj` ...) are accepted.

The output holds `vae_scale.models.dinov2.Dinov2`'s flat params (linear kernels [in, out], the patch
kernel HWIO) and, in its metadata, {NET_KEY: 'dinov2'} and the architecture as JSON, so
`models.frozen_weights.load_dinov2_params` returns both and any other file is refused with one line.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from etils import epath

from vae_scale.errors import ConversionError
from vae_scale.interop import safetensors_io
from vae_scale.models.frozen_weights import CONFIG_KEY
from vae_scale.models.frozen_weights import DINOV2_NET
from vae_scale.models.frozen_weights import NET_KEY
from vae_scale.models.frozen_weights import check_tensors
from vae_scale.models.dinov2 import Dinov2Config

MODEL_TYPES = ("dinov2", "dinov2_with_registers")
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers' config defaults per model type (configuration_dinov2*.py), for keys a file omits.
_HF_DEFAULTS = {
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                   hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14,
                   num_channels=3, qkv_bias=True, use_swiglu_ffn=False, num_register_tokens=0),
    "dinov2_with_registers": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
        hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=16, num_channels=3,
        qkv_bias=True, use_swiglu_ffn=False, num_register_tokens=4),
}
# transformers 5 renames the hub's names when loading (conversion_mapping.py); map them back.
_RENAMES = (("attention.q_proj.", "attention.attention.query."),
            ("attention.k_proj.", "attention.attention.key."),
            ("attention.v_proj.", "attention.attention.value."),
            ("attention.o_proj.", "attention.output.dense."),
            ("mlp.down_proj.", "mlp.weights_out."))
_PREFIXES = ("dinov2.", "dinov2_with_registers.")  # *ForImageClassification checkpoints.
_IGNORED = ("embeddings.mask_token", "classifier.")  # Masked pretraining; classification head.
_HOW = ("pass a transformers DINOv2 folder (config.json + model.safetensors), e.g. a download of "
        "facebook/dinov2-large")


def _square(value: Any, key: str, path: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConversionError(f"{path}: {key}={value} is not square, which vae_scale's DINOv2 "
                            "needs (the released checkpoints are)")
    value = value[0]
  return int(value)


def dinov2_config_from_hf(hf: Mapping[str, Any], path: str = "config.json",
                          pos_antialias: bool | None = None) -> Dinov2Config:
  """The architecture of a transformers DINOv2 `config.json`.

  Args:
    hf: the parsed config.json.
    path: its name, for messages.
    pos_antialias: override the position-embedding resampling (default: transformers' choice,
      antialias only for the registers model).

  Raises:
    ConversionError: another model type, or a setting vae_scale's DINOv2 does not implement.
  """
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ConversionError(f"{path} describes a {model_type!r} model, not DINOv2 (model_type "
                          f"{' or '.join(MODEL_TYPES)}); {_HOW}")
  get = lambda k: hf.get(k, _HF_DEFAULTS[model_type][k])
  if get("hidden_act") != "gelu" or get("num_channels") != 3:
    raise ConversionError(f"{path}: hidden_act={get('hidden_act')!r}, num_channels="
                          f"{get('num_channels')} (vae_scale's DINOv2 implements 'gelu' on 3 "
                          "channels, as every released DINOv2)")
  if pos_antialias is None:
    pos_antialias = model_type == "dinov2_with_registers"
  return Dinov2Config(
      hidden_size=int(get("hidden_size")), num_layers=int(get("num_hidden_layers")),
      num_heads=int(get("num_attention_heads")), mlp_ratio=float(get("mlp_ratio")),
      patch_size=_square(get("patch_size"), "patch_size", path),
      image_size=_square(get("image_size"), "image_size", path),
      num_register_tokens=(int(get("num_register_tokens"))
                           if model_type == "dinov2_with_registers" else 0),
      use_swiglu_ffn=bool(get("use_swiglu_ffn")), layer_norm_eps=float(get("layer_norm_eps")),
      qkv_bias=bool(get("qkv_bias")), pos_antialias=bool(pos_antialias))


def hf_shapes(cfg: Dinov2Config) -> dict[str, tuple[int, ...]]:
  """{hub name: shape} of a transformers DINOv2 checkpoint of this architecture."""
  c, p, hidden = cfg.hidden_size, cfg.patch_size, cfg.mlp_hidden
  out = {"embeddings.cls_token": (1, 1, c),
         "embeddings.position_embeddings": (1, 1 + cfg.pos_grid ** 2, c),
         "embeddings.patch_embeddings.projection.weight": (c, 3, p, p),
         "embeddings.patch_embeddings.projection.bias": (c,),
         "layernorm.weight": (c,), "layernorm.bias": (c,)}
  if cfg.num_register_tokens:
    out["embeddings.register_tokens"] = (1, cfg.num_register_tokens, c)
  mlp = ({"weights_in": (2 * hidden, c), "weights_out": (c, hidden)} if cfg.use_swiglu_ffn else
         {"fc1": (hidden, c), "fc2": (c, hidden)})
  for i in range(cfg.num_layers):
    pre = f"encoder.layer.{i}."
    for name in ("attention.attention.query", "attention.attention.key",
                 "attention.attention.value", "attention.output.dense"):
      out[f"{pre}{name}.weight"], out[f"{pre}{name}.bias"] = (c, c), (c,)
    for name in ("norm1", "norm2"):
      out[f"{pre}{name}.weight"], out[f"{pre}{name}.bias"] = (c,), (c,)
    out[f"{pre}layer_scale1.lambda1"] = out[f"{pre}layer_scale2.lambda1"] = (c,)
    for name, shape in mlp.items():
      out[f"{pre}mlp.{name}.weight"], out[f"{pre}mlp.{name}.bias"] = shape, shape[:1]
  if not cfg.qkv_bias:
    for i in range(cfg.num_layers):
      for name in ("query", "key", "value"):
        del out[f"encoder.layer.{i}.attention.attention.{name}.bias"]
  return out


def _hub_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The hub's names for a state dict in either naming; fused SwiGLU input; ignored entries gone."""
  out = {}
  for name, value in tensors.items():
    for prefix in _PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix):]
    if name.startswith(_IGNORED):
      continue
    for new, old in _RENAMES:
      name = name.replace(new, old)
    out[name] = value
  for name in [k for k in out if ".mlp.gate_proj." in k]:  # transformers 5: split SwiGLU input.
    up = name.replace(".mlp.gate_proj.", ".mlp.up_proj.")
    if up in out:
      fused = name.replace(".mlp.gate_proj.", ".mlp.weights_in.")
      out[fused] = np.concatenate([out.pop(name), out.pop(up)], axis=0)
  return out


def dinov2_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: Dinov2Config,
                          path: str = "SRC") -> dict[str, np.ndarray]:
  """`Dinov2(cfg)`'s flat float32 params from a transformers DINOv2 state dict (numpy).

  Args:
    tensors: the checkpoint's tensors, hub or transformers 5 names (mask token, classifier ignored).
    cfg: its architecture (`dinov2_config_from_hf`).
    path: the checkpoint's name, for messages.

  Raises:
    ConversionError: a tensor missing, unexpected or mis-shaped (one line naming the file).
  """
  sd = _hub_names(tensors)
  check_tensors(sd, hf_shapes(cfg), path, "DINOv2 weights matching its config.json", _HOW)
  f32 = lambda name: np.asarray(sd[name], np.float32)
  out = {"cls_token": f32("embeddings.cls_token").reshape(-1),
         "position_embeddings": f32("embeddings.position_embeddings")[0],
         "patch_embed.kernel": np.ascontiguousarray(
             f32("embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0)),
         "patch_embed.bias": f32("embeddings.patch_embeddings.projection.bias"),
         "norm.scale": f32("layernorm.weight"), "norm.bias": f32("layernorm.bias")}
  if cfg.num_register_tokens:
    out["register_tokens"] = f32("embeddings.register_tokens")[0]
  hidden = cfg.mlp_hidden
  for i in range(cfg.num_layers):
    src, dst = f"encoder.layer.{i}.", f"layers.{i}."

    def linear(theirs: str, ours: str, rows: slice = slice(None)) -> None:
      out[f"{dst}{ours}.kernel"] = np.ascontiguousarray(f32(f"{src}{theirs}.weight")[rows].T)
      if f"{src}{theirs}.bias" in sd:
        out[f"{dst}{ours}.bias"] = f32(f"{src}{theirs}.bias")[rows]

    for theirs, ours in (("attention.attention.query", "attn.query"),
                         ("attention.attention.key", "attn.key"),
                         ("attention.attention.value", "attn.value"),
                         ("attention.output.dense", "attn.out")):
      linear(theirs, ours)
    if cfg.use_swiglu_ffn:  # weights_in = [gate; up] (transformers chunks it in this order).
      linear("mlp.weights_in", "mlp.gate", slice(0, hidden))
      linear("mlp.weights_in", "mlp.up", slice(hidden, 2 * hidden))
      linear("mlp.weights_out", "mlp.down")
    else:
      linear("mlp.fc1", "mlp.fc1")
      linear("mlp.fc2", "mlp.fc2")
    for norm in ("norm1", "norm2"):
      out[f"{dst}{norm}.scale"] = f32(f"{src}{norm}.weight")
      out[f"{dst}{norm}.bias"] = f32(f"{src}{norm}.bias")
    out[f"{dst}layer_scale1"] = f32(f"{src}layer_scale1.lambda1")
    out[f"{dst}layer_scale2"] = f32(f"{src}layer_scale2.lambda1")
  return out


def _read_folder(src: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json, tensors) of a transformers folder, with one-line errors for what's wrong."""
  root = epath.Path(src)
  if not root.exists():
    raise ConversionError(f"{src} does not exist; {_HOW}")
  if not root.is_dir():
    raise ConversionError(f"{src} is a file; {_HOW} (the folder, not a file in it)")
  config_path = root / "config.json"
  if not config_path.exists():
    raise ConversionError(f"{src} has no config.json; {_HOW}")
  try:
    hf = json.loads(config_path.read_text())
  except ValueError as e:
    raise ConversionError(f"{config_path} is not valid JSON ({e}); {_HOW}") from e
  if not isinstance(hf, dict):
    raise ConversionError(f"{config_path} holds a {type(hf).__name__}, not a config; {_HOW}")
  if (root / WEIGHTS_FILE).exists():
    files = [root / WEIGHTS_FILE]
  elif (root / INDEX_FILE).exists():
    try:
      shards = sorted(set(json.loads((root / INDEX_FILE).read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
      raise ConversionError(f"{root / INDEX_FILE} has no weight_map; {_HOW}") from e
    files = [root / s for s in shards]
  else:
    pickles = sorted(p.name for p in root.iterdir()
                     if p.name.lower().endswith(safetensors_io.PICKLE_SUFFIXES))
    found = f"only pickle-based {pickles}, which vae_scale never unpickles" if pickles else (
        f"no {WEIGHTS_FILE}")
    raise ConversionError(f"{src} has {found}; save it with safetensors once (transformers: "
                          f"Dinov2Model.from_pretrained(DIR).save_pretrained(DIR)) or {_HOW}")
  tensors = {}
  for f in files:
    if not f.exists():
      raise ConversionError(f"{f} (listed in {INDEX_FILE}) does not exist; {_HOW}")
    try:
      tensors.update(safetensors_io.read_safetensors(os.fspath(f)))
    except ConversionError as e:  # Keep it one line (the pickle message has several).
      raise ConversionError(str(e).splitlines()[0]) from e
  return hf, tensors


def convert_dinov2(src_dir: str, out: str, *, pos_antialias: bool | None = None) -> Dinov2Config:
  """Writes a transformers DINOv2 folder's weights into one vae_scale safetensors file.

  Args:
    src_dir: the folder (config.json + model.safetensors or its shards).
    out: the .safetensors file to write (local or gs://).
    pos_antialias: override of the position-embedding resampling stored with the weights.

  Returns:
    The architecture written into the file's metadata.

  Raises:
    ConversionError: the folder is missing, holds another model or mis-shaped tensors, or only a
      pickle (one line saying what to do). Nothing is written then.
  """
  src_dir = os.fspath(src_dir)
  hf, tensors = _read_folder(src_dir)
  cfg = dinov2_config_from_hf(hf, os.path.join(src_dir, "config.json"), pos_antialias)
  params = dinov2_params_from_hf(tensors, cfg, src_dir)
  safetensors_io.write_safetensors(params, os.fspath(out), metadata={
      NET_KEY: DINOV2_NET, CONFIG_KEY: json.dumps(cfg.to_dict(), sort_keys=True),
      "model_type": str(hf.get("model_type")), "source": os.path.basename(src_dir.rstrip("/"))})
  return cfg
