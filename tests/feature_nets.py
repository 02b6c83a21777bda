"""Test helpers: seeded random LPIPS-VGG and pytorch-fid Inception weights, in PyTorch and converted.

No download anywhere: the reference networks are the `lpips` and `pytorch_fid` packages' own modules
with seeded random weights (`pnet_rand=True`; a random state dict shaped like
pt_inception-2015-12-05), so the JAX ports are compared with them weight for weight.
"""

import os
import warnings

import numpy as np


def photos(size: int) -> np.ndarray:
  """astronaut, chelsea, coffee: centre square crops resized, [3, size, size, 3] in [-1, 1]."""
  from skimage import data, transform  # pylint: disable=g-import-not-at-top
  out = []
  for name in ("astronaut", "chelsea", "coffee"):
    img = getattr(data, name)().astype(np.float64) / 255.0
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    out.append(transform.resize(img, (size, size), anti_aliasing=True))
  return (np.stack(out) * 2 - 1).astype(np.float32)


def nchw(x):
  """NHWC numpy -> NCHW torch tensor."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


# ------------------------------------------------------------------------------ LPIPS


def torch_lpips():
  """`lpips.LPIPS(net='vgg')` with a seeded random VGG (biases N(0, 0.05), not torchvision's
  zeros, so the conversion of every tensor matters) and the package's own lin weights; eval mode."""
  import lpips as lpips_pkg  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation inside lpips.
    net = lpips_pkg.LPIPS(net="vgg", pnet_rand=True, verbose=False)
  with torch.no_grad():
    for name, p in net.net.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.05)
  return net.eval()


def lpips_files(net, directory) -> tuple[str, str]:
  """Writes `net`'s VGG as a torchvision-named `vgg16.pth` and converts it with the package's lin
  weights into `lpips_vgg.safetensors`; returns (safetensors path, vgg .pth path)."""
  import torch  # pylint: disable=g-import-not-at-top
  from vae_scale.interop import torch_convert  # pylint: disable=g-import-not-at-top
  vgg = {"features." + k.split(".", 1)[1]: v for k, v in net.net.state_dict().items()}
  assert len(vgg) == 26
  vgg_path = os.path.join(directory, "vgg16.pth")
  torch.save(vgg, vgg_path)
  out = os.path.join(directory, "lpips_vgg.safetensors")
  torch_convert.convert_lpips(out, vgg_path=vgg_path, lin_path=torch_convert.default_lin_path())
  return out, vgg_path


# ------------------------------------------------------------------------------ Inception


def inception_state_dict() -> dict:
  """A seeded state dict shaped like pt_inception-2015-12-05 (fc has its 1008 classes), with
  non-trivial batch norm statistics: mean N(0, 0.2), var U(0.5, 1.5), scale U(0.5, 1.5)."""
  import pytorch_fid.inception as pfi  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    shapes = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()  # pylint: disable=protected-access
  g = torch.Generator().manual_seed(0)
  sd = {}
  for k, v in shapes.items():
    if k.endswith("num_batches_tracked"):
      sd[k] = v
    elif k.endswith(("running_var", "bn.weight")):
      sd[k] = torch.rand(v.shape, generator=g) + 0.5
    elif k.endswith(("running_mean", "bn.bias")):
      sd[k] = 0.2 * torch.randn(v.shape, generator=g)
    elif v.ndim == 4:  # He-normal keeps activations O(1) through the 94 convs.
      sd[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
    else:
      sd[k] = 0.01 * torch.randn(v.shape, generator=g)
  return sd


def torch_inception(state_dict):
  """`pytorch_fid.inception.InceptionV3([pool3])` holding `state_dict` (its download replaced)."""
  import pytest  # pylint: disable=g-import-not-at-top
  import pytorch_fid.inception as pfi  # pylint: disable=g-import-not-at-top
  # pytorch-fid downloads its weights through this name (torch.utils.model_zoo.load_url here).
  assert hasattr(pfi, "load_state_dict_from_url")
  with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state_dict)
    net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
  return net.eval()


def inception_files(state_dict, directory) -> tuple[str, str]:
  """Saves `state_dict` as pt_inception-2015-12-05-6726825d.pth and converts it into
  `inception.safetensors`; returns (safetensors path, .pth path)."""
  import torch  # pylint: disable=g-import-not-at-top
  from vae_scale.models import frozen_weights  # pylint: disable=g-import-not-at-top
  from vae_scale.interop import torch_convert  # pylint: disable=g-import-not-at-top
  src = os.path.join(directory, frozen_weights.INCEPTION_FILE)
  torch.save(state_dict, src)
  out = os.path.join(directory, "inception.safetensors")
  torch_convert.convert_inception(src, out)
  return out, src


def tagged_file(path, net: str) -> str:
  """A small safetensors file tagged as network `net` (a weights file of the wrong network)."""
  from vae_scale.interop import safetensors_io  # pylint: disable=g-import-not-at-top
  from vae_scale.models import frozen_weights  # pylint: disable=g-import-not-at-top
  safetensors_io.write_safetensors({"a": np.zeros(2, np.float32)}, str(path),
                                   metadata={frozen_weights.NET_KEY: net})
  return str(path)


# ------------------------------------------------------------------------------ DINOv2


def torch_dinov2(registers: bool = False, seed: int = 0, **config):
  """transformers' `Dinov2Model` (or `Dinov2WithRegistersModel`) of `config`, every tensor seeded
  random and non-trivial: weights N(0, 0.02) as transformers initialises them, but also biases
  N(0, 0.05), norm scales U(0.5, 1.5), layer scales U(0.5, 1.5), position embeddings, CLS and
  register tokens N(0, 0.5) (transformers' own init leaves many at 0 or 1, where a wrong mapping
  would go unseen). float32, eval mode, eager attention."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  if registers:
    cfg = transformers.Dinov2WithRegistersConfig(**config)
    net = transformers.Dinov2WithRegistersModel(cfg)
  else:
    cfg = transformers.Dinov2Config(**config)
    net = transformers.Dinov2Model(cfg)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith("bias"):
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
      elif "norm" in name or "lambda1" in name:
        p.copy_(torch.rand(p.shape, generator=g) + 0.5)
      elif p.ndim <= 3 and "embeddings." in name:  # cls, mask, register, position tokens.
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
  return net.eval()



def dinov2_file(path, hidden_size: int = 16, seed: int = 0, **config) -> str:
  """A tiny DINOv2 weights file as `convert dinov2` writes it (tagged, architecture in the
  metadata), with flax's seeded random init and no torch: for the VF loss's wiring tests."""
  import json  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vae_scale.interop import safetensors_io  # pylint: disable=g-import-not-at-top
  from vae_scale.models import dinov2  # pylint: disable=g-import-not-at-top
  from vae_scale.models import frozen_weights  # pylint: disable=g-import-not-at-top
  from vae_scale.models.lpips import flat_state  # pylint: disable=g-import-not-at-top
  cfg = dinov2.Dinov2Config(**{"hidden_size": hidden_size, "num_layers": 2, "num_heads": 2,
                               "image_size": 56, **config})
  net = dinov2.Dinov2(cfg, rngs=nnx.Rngs(seed))
  params = {k: np.asarray(v, np.float32) for k, v in flat_state(nnx.state(net, nnx.Param)).items()}
  safetensors_io.write_safetensors(params, str(path), metadata={
      frozen_weights.NET_KEY: frozen_weights.DINOV2_NET,
      frozen_weights.CONFIG_KEY: json.dumps(cfg.to_dict(), sort_keys=True)})
  return str(path)
