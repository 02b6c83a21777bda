"""The frozen feature networks' weights (LPIPS-VGG, pytorch-fid's Inception) from PyTorch files.

Each network is converted once into one safetensors file whose metadata names it
({"vae_scale_net": ...}); training and evaluation only ever read those files:

  python -m vae_scale.convert lpips --out=lpips_vgg.safetensors \
      [--vgg=vgg16-397923af.pth] [--lin=lpips/weights/v0.1/vgg.pth]
  python -m vae_scale.convert inception --src=pt_inception-2015-12-05-6726825d.pth \
      --out=inception.safetensors

Torch files are read with `torch.load(..., map_location="cpu", weights_only=True)` only (tensors,
never arbitrary objects). Layouts: conv OIHW -> HWIO; batch norm weight, bias, running_mean,
running_var -> scale, bias, mean, var. The loaders return flat {name: float32 array} dicts, the
params `vae_scale.models.lpips.lpips_distance` and `vae_scale.models.inception.inception_features`
take.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from typing import Mapping

import numpy as np
import safetensors.numpy
from etils import epath

from vae_scale.errors import ConversionError
from vae_scale.interop.safetensors_io import PICKLE_SUFFIXES
from vae_scale.interop.safetensors_io import write_safetensors
from vae_scale.models import inception
from vae_scale.models import lpips

NET_KEY = "vae_scale_net"  # safetensors metadata entry naming the network.
LPIPS_NET = "lpips_vgg_v0.1"
INCEPTION_NET = "pytorch_fid_inception_2015_12_05"
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16 ImageNet weights (IMAGENET1K_V1).
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 + INCEPTION_FILE)
VGG_FEATURE_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # Convs in vgg16().features.
_GET_VGG = ("get torchvision's VGG16 ImageNet weights with: python -c \"import torchvision; "
            "torchvision.models.vgg16(weights='IMAGENET1K_V1')\" (it caches vgg16-397923af.pth "
            "where this looks), or pass --vgg=PATH")
_MAX_LISTED = 5


def lpips_command(out: str = "FILE") -> str:
  return f"python -m vae_scale.convert lpips --out={out}"


def inception_command(out: str = "FILE") -> str:
  return f"python -m vae_scale.convert inception --src={INCEPTION_FILE} --out={out}"


def default_vgg_path() -> str:
  """Where torchvision caches VGG16's ImageNet weights: $TORCH_HOME/hub/checkpoints/..."""
  try:
    import torch.hub  # pylint: disable=g-import-not-at-top
    hub = torch.hub.get_dir()
  except ImportError:
    hub = os.path.join(os.path.expanduser(os.getenv("TORCH_HOME", "~/.cache/torch")), "hub")
  return os.path.join(hub, "checkpoints", VGG16_FILE)


def default_lin_path() -> str:
  """The lin-layer weights inside the installed `lpips` package (found without importing it)."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise ConversionError("the lpips package is not installed, and it holds LPIPS's lin weights "
                          "(lpips/weights/v0.1/vgg.pth): pip install lpips, or pass --lin=PATH")
  return os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")


# ------------------------------------------------------------------------------ reading torch


def _torch_state_dict(path: str, how: str) -> dict[str, np.ndarray]:
  """A torch state dict's tensors as float32 numpy, read with weights_only=True."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path} does not exist; {how}")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"reading {path} needs PyTorch (the CPU build is enough): "
                          "pip install torch") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise ConversionError(f"{path} is not a PyTorch state dict that loads with weights_only=True "
                          f"({type(e).__name__}: {first}); {how}") from e
  if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
    sd = sd["state_dict"]
  if not isinstance(sd, Mapping):
    raise ConversionError(f"{path} holds a {type(sd).__name__}, not a state dict; {how}")
  return {k: v.detach().cpu().float().numpy() for k, v in sd.items() if torch.is_tensor(v)}


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def check_tensors(tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]],
                  path: str, what: str, how: str) -> None:
  """Raises a one-line ConversionError naming missing, unexpected and mis-shaped entries."""
  missing = sorted(set(expected) - set(tensors))
  extra = sorted(set(tensors) - set(expected))
  shaped = [f"{k} {tuple(np.shape(tensors[k]))} (expected {expected[k]})" for k in sorted(expected)
            if k in tensors and tuple(np.shape(tensors[k])) != expected[k]]
  problems = ([f"missing {missing[:_MAX_LISTED]}"] if missing else []) + (
      [f"unexpected {extra[:_MAX_LISTED]}"] if extra else []) + shaped[:_MAX_LISTED]
  if problems:
    raise ConversionError(f"{path} does not hold {what}: {'; '.join(problems)}; {how}")


def _from_torch(sd: Mapping[str, np.ndarray], names: Mapping[str, str],
                shapes: Mapping[str, tuple[int, ...]], path: str, what: str,
                how: str) -> dict[str, np.ndarray]:
  """Our params {ours: array} from a torch state dict, given {ours: torch name}; other entries
  of the state dict (classifier, fc, BN counters) are ignored."""
  torch_shapes = {t: ((s[3], s[2], s[0], s[1]) if len(s) == 4 else s)  # HWIO -> OIHW
                  for t, s in ((names[k], shapes[k]) for k in names)}
  check_tensors({t: sd[t] for t in torch_shapes if t in sd}, torch_shapes, path, what, how)
  return {k: _oihw_to_hwio(sd[t]) if sd[t].ndim == 4 else sd[t] for k, t in names.items()}


# ------------------------------------------------------------------------------ conversion


def lpips_params_from_torch(vgg: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray],
                            vgg_path: str = "VGG", lin_path: str = "LIN") -> dict[str, np.ndarray]:
  """LPIPS params from torchvision VGG16 (`features.N.weight/bias`) and lpips lin state dicts.

  Args:
    vgg: torchvision `vgg16().state_dict()` as numpy (the classifier is ignored).
    lin: the lpips package's `lin{k}.model.1.weight` [1, C, 1, 1] tensors.
    vgg_path: the VGG file's name, for messages.
    lin_path: the lin file's name, for messages.

  Returns:
    Flat params: `conv{b}_{i}.kernel` HWIO, `conv{b}_{i}.bias`, `lin{k}.kernel` [1, 1, C, 1].

  Raises:
    ConversionError: a tensor is missing or mis-shaped (one line naming the file).
  """
  shapes = lpips.lpips_shapes()
  convs = {f"{name}.{leaf}": f"features.{idx}.{torch_leaf}"
           for name, idx in zip(lpips.conv_names(), VGG_FEATURE_INDICES)
           for leaf, torch_leaf in (("kernel", "weight"), ("bias", "bias"))}
  lins = {f"lin{k}.kernel": f"lin{k}.model.1.weight" for k in range(len(lpips.CHANNELS))}
  out = _from_torch(vgg, convs, shapes, vgg_path, "torchvision's VGG16 weights", _GET_VGG)
  out.update(_from_torch(lin, lins, shapes, lin_path, "LPIPS v0.1 VGG lin layers",
                         "use lpips/weights/v0.1/vgg.pth of the lpips package (--lin=PATH)"))
  return out


def convert_lpips(out: str, vgg_path: str | None = None, lin_path: str | None = None) -> None:
  """Writes LPIPS-VGG v0.1 weights into one safetensors file.

  Args:
    out: the .safetensors file to write (local or gs://).
    vgg_path: torchvision's `vgg16-397923af.pth`; default: torchvision's download cache.
    lin_path: the lin weights; default: `lpips/weights/v0.1/vgg.pth` of the installed package.

  Raises:
    ConversionError: a file is missing or holds something else (one line saying what to do).
  """
  vgg_path = os.fspath(vgg_path) if vgg_path else default_vgg_path()
  lin_path = os.fspath(lin_path) if lin_path else default_lin_path()
  vgg = _torch_state_dict(vgg_path, _GET_VGG)
  lin = _torch_state_dict(lin_path, "pip install lpips (it ships weights/v0.1/vgg.pth), or pass "
                          "--lin=PATH")
  params = lpips_params_from_torch(vgg, lin, vgg_path, lin_path)
  write_safetensors(params, os.fspath(out), metadata={
      NET_KEY: LPIPS_NET, "vgg": os.path.basename(vgg_path), "lin": os.path.basename(lin_path)})


def inception_params_from_torch(sd: Mapping[str, np.ndarray],
                                path: str = "SRC") -> dict[str, np.ndarray]:
  """Inception params from pytorch-fid's FID Inception state dict (fc and BN counters ignored).

  Args:
    sd: the state dict of `pt_inception-2015-12-05-6726825d.pth` as numpy.
    path: its file name, for messages.

  Returns:
    Flat params `X.conv.kernel` HWIO, `X.bn.scale/bias/mean/var` [C], X the torch module path.
  """
  how = f"use pytorch-fid's FID weights {INCEPTION_URL}"
  fc = sd.get("fc.weight")
  if "AuxLogits.fc.weight" in sd or (fc is not None and fc.shape[0] != 1008):
    raise ConversionError(f"{path} looks like torchvision's ImageNet Inception-v3, not "
                          f"pytorch-fid's FID Inception (1008 classes, FID blocks); {how}")
  torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                "var": "running_var"}
  shapes = inception.inception_shapes()
  names = {k: f"{k.rsplit('.', 1)[0]}.{torch_leaf[k.rsplit('.', 1)[1]]}" for k in shapes}
  return _from_torch(sd, names, shapes, path, "pytorch-fid's FID Inception-v3 weights", how)


def convert_inception(src: str, out: str) -> None:
  """Writes pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`) to safetensors.

  Raises:
    ConversionError: the file is missing or holds another network (one line saying what to do).
  """
  src = os.fspath(src)
  sd = _torch_state_dict(src, f"download pytorch-fid's FID weights from {INCEPTION_URL}")
  params = inception_params_from_torch(sd, src)
  write_safetensors(params, os.fspath(out),
                    metadata={NET_KEY: INCEPTION_NET, "source": os.path.basename(src)})


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
