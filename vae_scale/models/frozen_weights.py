"""The frozen feature networks' weights (LPIPS-VGG, pytorch-fid's Inception, DINOv2): the one loader.

Each network's weights are converted once into one safetensors file whose metadata names it
({"vae_scale_net": ...}) by `python -m vae_scale.convert lpips|inception|dinov2`
(`interop.torch_convert`, the only code that reads PyTorch files, and `interop.dinov2_weights`). Training and evaluation read only those files, here, each
checked name by name and shape by shape before anything compiles. `load_feature_nets` is what a run
or an evaluation calls: the networks its config (or flags) ask for.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import numpy as np
import safetensors.numpy
from etils import epath

from vae_scale.errors import ConfigError
from vae_scale.errors import ConversionError
from vae_scale.models import dinov2
from vae_scale.models import inception
from vae_scale.models import lpips
from vae_scale.models.dinov2 import Dinov2Config

# Files that unpickle (torch.save and friends): never loaded, named in an error instead.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
NET_KEY = "vae_scale_net"  # safetensors metadata entry naming the network.
LPIPS_NET = "lpips_vgg_v0.1"
INCEPTION_NET = "pytorch_fid_inception_2015_12_05"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
DINOV2_NET = "dinov2"
CONFIG_KEY = "dinov2_config"  # Metadata entry holding Dinov2Config.to_dict() as JSON.
_MAX_LISTED = 5


def dinov2_command(out: str = "FILE", src: str = "DIR") -> str:
  return f"python -m vae_scale.convert dinov2 --src={src} --out={out}"


def lpips_command(out: str = "FILE") -> str:
  return f"python -m vae_scale.convert lpips --out={out}"


def inception_command(out: str = "FILE") -> str:
  return f"python -m vae_scale.convert inception --src={INCEPTION_FILE} --out={out}"


def check_tensors(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], path: str,
           what: str, how: str) -> None:
  """Raises a one-line ConversionError naming missing, unexpected and mis-shaped entries."""
  missing = sorted(set(expected) - set(tensors))
  extra = sorted(set(tensors) - set(expected))
  shaped = [f"{k} {tuple(np.shape(tensors[k]))} (expected {expected[k]})" for k in sorted(expected)
            if k in tensors and tuple(np.shape(tensors[k])) != expected[k]]
  problems = ([f"missing {missing[:_MAX_LISTED]}"] if missing else []) + (
      [f"unexpected {extra[:_MAX_LISTED]}"] if extra else []) + shaped[:_MAX_LISTED]
  if problems:
    raise ConversionError(f"{path} does not hold {what}: {'; '.join(problems)}; {how}")



# ------------------------------------------------------------------------------ loading


def _looks_like_pickle(path: str) -> bool:
  if path.lower().endswith(PICKLE_SUFFIXES):
    return True
  head = epath.Path(path).open("rb").read(2)
  return head[:2] == b"PK" or head[:1] == b"\x80"  # torch.save's zip, or a raw pickle stream.


def _safetensors_metadata(path: str) -> dict[str, str] | None:
  """The `__metadata__` of a safetensors header; None when the file isn't safetensors."""
  with epath.Path(path).open("rb") as f:
    head = f.read(8)
    if len(head) < 8:
      return None
    (size,) = struct.unpack("<Q", head)
    if size > 100_000_000:
      return None
    try:
      header = json.loads(f.read(size))
    except ValueError:
      return None
  if not isinstance(header, dict):
    return None
  return header.get("__metadata__") or {}


def read_tagged(path: str, net: str, what: str, command: str
                ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The float32 tensors and metadata of a weights file tagged {NET_KEY: net}.

  Raises:
    ConversionError: missing file, a pickle, not safetensors, or another network's file (one line
      naming the file and `command`, the one that makes the right file).
  """
  path = os.fspath(path)
  make = f"make it with: {command}"
  if not epath.Path(path).exists():
    raise ConversionError(f"{path} does not exist; {make}")
  # The header is parsed before any pickle sniffing: a safetensors file starts with its header's
  # length, whose low byte can be 0x80 (a pickle's first byte) by chance.
  meta = None if path.lower().endswith(PICKLE_SUFFIXES) else _safetensors_metadata(path)
  if meta is None and _looks_like_pickle(path):
    raise ConversionError(f"{path} is a pickle-based PyTorch file, which vae_scale never "
                          f"unpickles; convert it once to safetensors: {command}")
  if meta is None:
    raise ConversionError(f"{path} is not a safetensors file; {make}")
  if meta.get(NET_KEY) != net:
    found = f"{NET_KEY}={meta[NET_KEY]!r}" if NET_KEY in meta else f"no {NET_KEY!r} tag"
    raise ConversionError(f"{path} is not vae_scale's {what} weights file ({found}, expected "
                          f"{net!r}); {make}")
  try:
    # Not read_safetensors: its pickle sniffing looks at byte 0 before the header (see above).
    tensors = safetensors.numpy.load(epath.Path(path).read_bytes())
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise ConversionError(f"{path} could not be read as safetensors ({first}); {make}") from e
  return {k: np.asarray(v, np.float32) for k, v in tensors.items()}, meta


def _load(path: str, net: str, what: str, command: str,
          expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  tensors, _ = read_tagged(path, net, what, command)
  check_tensors(tensors, expected, os.fspath(path), f"vae_scale's {what} weights",
                f"make it with: {command}")
  return tensors


def _out_name(path: str) -> str:
  path = os.fspath(path)
  return path if path.endswith(".safetensors") else "FILE.safetensors"


def load_lpips_params(path: str) -> dict[str, np.ndarray]:
  """LPIPS-VGG params from a file `convert_lpips` wrote, checked name by name and shape by shape.

  Returns:
    Flat {name: float32 numpy} for `vae_scale.models.lpips.lpips_distance` (see `lpips_shapes`).

  Raises:
    ConversionError: missing file, a pickle, another network's file or wrong shapes (one line
      naming the file and the command that makes the right one).
  """
  return _load(path, LPIPS_NET, "LPIPS-VGG v0.1", lpips_command(_out_name(path)),
               lpips.lpips_shapes())


def load_inception_params(path: str) -> dict[str, np.ndarray]:
  """pytorch-fid Inception params from a file `convert_inception` wrote, checked like LPIPS's.

  Returns:
    Flat {name: float32 numpy} for `vae_scale.models.inception.inception_features`.

  Raises:
    ConversionError: as `load_lpips_params`, with the inception command.
  """
  return _load(path, INCEPTION_NET, "pytorch-fid Inception", inception_command(_out_name(path)),
               inception.inception_shapes())


def load_feature_nets(lpips_weights: str = "", inception_weights: str = ""
                      ) -> dict[str, dict[str, np.ndarray]]:
  """The frozen networks asked for, by name: 'lpips' and/or 'inception' ('' = not asked for).

  Raises:
    ConversionError: as `load_lpips_params` / `load_inception_params`.
  """
  nets = {}
  if lpips_weights:
    nets["lpips"] = load_lpips_params(lpips_weights)
  if inception_weights:
    nets["inception"] = load_inception_params(inception_weights)
  return nets


def load_dinov2_params(path: str) -> tuple[dict[str, np.ndarray], Dinov2Config]:
  """DINOv2 params and architecture from a file `convert_dinov2` wrote, checked shape by shape.

  Returns:
    (flat {name: float32 numpy} for `vae_scale.models.dinov2.dinov2_features`, its Dinov2Config).

  Raises:
    ConversionError: missing file, a pickle, another network's file, no architecture in the
      metadata or wrong shapes (one line naming the file and the command that makes it).
  """
  path = os.fspath(path)
  command = dinov2_command(path if path.endswith(".safetensors") else "FILE.safetensors")
  tensors, meta = read_tagged(path, DINOV2_NET, "DINOv2", command)
  try:
    cfg = Dinov2Config.from_dict(json.loads(meta[CONFIG_KEY]))
  except (KeyError, ValueError, TypeError) as e:
    raise ConversionError(f"{path} has no readable {CONFIG_KEY!r} metadata ({e}); make it again "
                          f"with: {command}") from e
  check_tensors(tensors, dinov2.dinov2_shapes(cfg), path, "vae_scale's DINOv2 weights",
                f"make it with: {command}")
  return tensors, cfg


def load_vf_dinov2(config: Any) -> tuple[dict[str, np.ndarray], Dinov2Config] | None:
  """The DINOv2 of a run's VF loss (config.loss.vf_weights), checked against the config's width;
  None when the loss has no VF term (loss.vf_weight 0).

  Raises:
    ConversionError: as `load_dinov2_params`.
    ConfigError: the file's width is not config.loss.vf_feature_dim (one line naming both).
  """
  loss = config.loss
  if loss.vf_weight <= 0:
    return None
  params, cfg = load_dinov2_params(loss.vf_weights)
  if cfg.hidden_size != loss.vf_feature_dim:
    raise ConfigError(
        f"config.loss.vf_weights: {loss.vf_weights} holds a DINOv2 of width {cfg.hidden_size} "
        f"({cfg.num_layers} layers), but config.loss.vf_feature_dim is {loss.vf_feature_dim} "
        f"(the VF projection's width): pass --config.loss.vf_feature_dim={cfg.hidden_size}, or "
        f"convert the DINOv2 of width {loss.vf_feature_dim}")
  return params, cfg
