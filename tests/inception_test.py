"""pytorch-fid's FID Inception against `pytorch_fid.inception.InceptionV3` (seeded random weights).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import feature_nets
from vae_scale.errors import ConversionError
from vae_scale.models import frozen_weights
from vae_scale.interop import torch_convert
from vae_scale.models import inception
from vae_scale.models.lpips import merge_params

F = torch.nn.functional


@pytest.fixture(scope="module")
def state_dict():
  return feature_nets.inception_state_dict()


@pytest.fixture(scope="module")
def torch_net(state_dict):
  return feature_nets.torch_inception(state_dict)


@pytest.fixture(scope="module")
def files(state_dict, tmp_path_factory):
  """(converted .safetensors, the .pth it came from)."""
  return feature_nets.inception_files(state_dict, str(tmp_path_factory.mktemp("inception")))


@pytest.fixture(scope="module")
def params(files):
  return frozen_weights.load_inception_params(files[0])


@pytest.mark.parametrize("size", [(256, 256), (512, 512), (64, 64), (200, 300), (299, 299)])
def test_resize_matches_torch_interpolate(size):
  x = np.random.default_rng(0).uniform(0, 1, (2, *size, 3)).astype(np.float32)
  ref = F.interpolate(feature_nets.nchw(x), size=(299, 299), mode="bilinear", align_corners=False)
  out = np.asarray(jax.jit(inception.resize_bilinear)(x))
  assert out.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(out, ref.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


# Each block alone on a small input: the FID patches (count_include_pad=False average pools, E_2's
# max pool) and torchvision's B and D blocks, without compiling the whole network.
BLOCKS = [
    ("Mixed_5b", 2, 0, lambda kw: inception.InceptionA(192, 32, **kw), 192),
    ("Mixed_6a", 2, 3, lambda kw: inception.InceptionB(288, **kw), 288),
    ("Mixed_6e", 2, 7, lambda kw: inception.InceptionC(768, 192, **kw), 768),
    ("Mixed_7a", 3, 0, lambda kw: inception.InceptionD(768, **kw), 768),
    ("Mixed_7b", 3, 1, lambda kw: inception.InceptionE(1280, "avg", **kw), 1280),
    ("Mixed_7c", 3, 2, lambda kw: inception.InceptionE(2048, "max", **kw), 2048),
]


@pytest.mark.parametrize("name,block,index,make,cin", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_matches_torch(torch_net, params, name, block, index, make, cin):
  sub = {k[len(name) + 1:]: v for k, v in params.items() if k.startswith(name + ".")}
  model = merge_params(lambda: make(dict(dtype=jnp.float32, precision=None, rngs=nnx.Rngs(0))), sub)
  x = np.random.default_rng(1).normal(0, 1, (2, 7, 7, cin)).astype(np.float32)
  x[:, :, 0] = 5.0  # A bright edge column makes padded-vs-unpadded pool averages differ.
  with torch.no_grad():
    ref = torch_net.blocks[block][index](feature_nets.nchw(x)).numpy().transpose(0, 2, 3, 1)
  out = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
  assert out.shape == ref.shape
  # Float32 accumulation over up to 2048 channels (the bright column sums large terms): measured
  # max |out - ref| ~2e-5.
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_pool3_features_match_pytorch_fid(torch_net, params):
  images = feature_nets.photos(256)  # Not 299: the resize is part of what is compared.
  with torch.no_grad():
    # pytorch-fid takes images in [0, 1].
    ref = torch_net(feature_nets.nchw((images + 1) / 2))[0].numpy().reshape(3, 2048)
  out = np.asarray(jax.jit(inception.inception_features)(params, images))
  assert out.shape == (3, 2048) and out.dtype == np.float32
  assert ref.std() > 0.1  # The random weights give non-degenerate features.
  # Elementwise |out - ref| <= 1e-4 + 1e-4 |ref| (measured: max |out - ref| 8.6e-6, features up
  # to ~36).
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_params_layout(params, state_dict):
  assert set(params) == set(inception.inception_shapes())
  w = state_dict["Mixed_6b.branch7x7_2.conv.weight"].numpy()  # [O, I, 1, 7]
  np.testing.assert_array_equal(params["Mixed_6b.branch7x7_2.conv.kernel"], w.transpose(2, 3, 1, 0))
  assert params["Mixed_6b.branch7x7_2.conv.kernel"].shape == (1, 7, 128, 128)
  np.testing.assert_array_equal(params["Mixed_7c.branch_pool.bn.var"],
                                state_dict["Mixed_7c.branch_pool.bn.running_var"].numpy())
  np.testing.assert_array_equal(params["Conv2d_1a_3x3.bn.scale"],
                                state_dict["Conv2d_1a_3x3.bn.weight"].numpy())


def _one_line_error(fn, *args) -> str:
  with pytest.raises(ConversionError) as e:
    fn(*args)
  message = str(e.value)
  assert "\n" not in message
  return message


def test_refuses_other_files(files, state_dict, tmp_path):
  _, src = files
  command = ("python -m vae_scale.convert inception --src=pt_inception-2015-12-05-6726825d.pth "
             "--out=")
  msg = _one_line_error(frozen_weights.load_inception_params, src)
  assert src in msg and "pickle" in msg and command in msg
  missing = str(tmp_path / "missing.safetensors")
  assert command + missing in _one_line_error(frozen_weights.load_inception_params, missing)
  # torchvision's ImageNet Inception has the same layer names but 1000 classes and AuxLogits.
  torch.save({"fc.weight": torch.zeros(1000, 2048), "AuxLogits.fc.weight": torch.zeros(1000, 768)},
             tmp_path / "inception_v3_google.pth")
  msg = _one_line_error(torch_convert.convert_inception, str(tmp_path / "inception_v3_google.pth"),
                        str(tmp_path / "x.safetensors"))
  assert "torchvision" in msg and "pt_inception-2015-12-05-6726825d.pth" in msg
  torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
  msg = _one_line_error(torch_convert.convert_inception, str(tmp_path / "partial.pth"),
                        str(tmp_path / "x.safetensors"))
  assert "missing" in msg and "Conv2d_1a_3x3.conv.weight" in msg
  assert not (tmp_path / "x.safetensors").exists()
  sd = {k: v.numpy() for k, v in state_dict.items()}
  sd["Mixed_6c.branch7x7_2.conv.weight"] = sd["Mixed_6c.branch7x7_2.conv.weight"].transpose(0, 1, 3, 2)
  msg = _one_line_error(torch_convert.inception_params_from_torch, sd, "SRC")
  assert "Mixed_6c.branch7x7_2.conv.weight (160, 160, 7, 1) (expected (160, 160, 1, 7))" in msg
