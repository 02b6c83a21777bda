"""models.dinov2 against transformers' Dinov2Model / Dinov2WithRegistersModel (seeded random
weights, real photographs), and interop.dinov2_weights: conversion, loading, one-line refusals."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

import feature_nets
from conftest import REPO
from vae_scale.tools import convert
from vae_scale.errors import ConversionError
from vae_scale.interop import dinov2_weights
from vae_scale.interop import safetensors_io
from vae_scale.models import frozen_weights
from vae_scale.models import dinov2

# The bound the issue sets on the patch tokens after the final norm (values of order 1-5).
# Measured: <= 2.1e-6 for the small configs, 6.9e-6 for ViT-L (float32, CPU).
ATOL = 1e-4
SMALL = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=56,
             patch_size=14)  # A 4 x 4 position grid.
# name: (registers, extra config). The registers model resamples position embeddings with
# antialias, the plain one without; giant's SwiGLU MLP both ways.
CASES = {"plain": (False, {}), "registers": (True, {"num_register_tokens": 3}),
         "swiglu": (False, {"use_swiglu_ffn": True}),
         "swiglu_registers": (True, {"use_swiglu_ffn": True})}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
  """(transformers net, params converted through a folder and a file, their config)."""
  registers, extra = CASES[request.param]
  net = feature_nets.torch_dinov2(registers=registers, **SMALL, **extra)
  root = tmp_path_factory.mktemp(request.param)
  net.save_pretrained(root / "hf")
  out = str(root / "dinov2.safetensors")
  written = dinov2_weights.convert_dinov2(str(root / "hf"), out)
  params, cfg = frozen_weights.load_dinov2_params(out)
  assert cfg == written and cfg.pos_antialias == registers
  return net, params, cfg


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A converted plain small model: (transformers folder, converted file)."""
  net = feature_nets.torch_dinov2(**SMALL)
  root = tmp_path_factory.mktemp("small")
  net.save_pretrained(root / "hf")
  out = str(root / "dinov2.safetensors")
  dinov2_weights.convert_dinov2(str(root / "hf"), out)
  return root / "hf", out


def _images():
  """{name: [3, H, W, 3]}: astronaut, chelsea, coffee on the trained 4 x 4 grid (ImageNet-
  normalised, as DINOv2 is usually fed) and on a 5 x 3 grid ([-1, 1], as LightningDiT feeds it)."""
  native = dinov2.preprocess(jnp.asarray(feature_nets.photos(64)), (4, 4), normalize="imagenet")
  return {"native": np.asarray(native), "resampled": feature_nets.photos(70)[:, :, :42]}


def _reference(net, pixels: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return net(pixel_values=feature_nets.nchw(pixels)).last_hidden_state.numpy()


def _assert_matches(out: dinov2.Dinov2Output, ref: np.ndarray, registers: int) -> None:
  first = 1 + registers
  assert out.patches.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out.patches), ref[:, first:].reshape(out.patches.shape),
                             rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.asarray(out.cls), ref[:, 0], rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.asarray(out.registers), ref[:, 1:first], rtol=0, atol=ATOL)


def test_matches_transformers(case):
  net, params, cfg = case
  features = jax.jit(lambda p, x: dinov2.dinov2_features(p, cfg, x))
  for name, pixels in _images().items():
    out = features(params, pixels)
    grid = (pixels.shape[1] // 14, pixels.shape[2] // 14)
    assert out.patches.shape == (3, *grid, 48), name
    assert out.registers.shape == (3, cfg.num_register_tokens, 48)
    _assert_matches(out, _reference(net, pixels), cfg.num_register_tokens)


def test_transformers_in_memory_names_convert_the_same(case):
  """transformers 5 renames the hub's tensors when loading (q_proj, o_proj, gate_proj + up_proj
  for the fused weights_in); its state_dict converts to the same params as the saved file."""
  net, params, cfg = case
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  assert any(".attention.q_proj." in k for k in sd)
  got = dinov2_weights.dinov2_params_from_hf(sd, cfg)
  assert sorted(got) == sorted(params)
  for k, v in got.items():
    np.testing.assert_array_equal(v, params[k], err_msg=k)


@pytest.mark.slow  # A 304M-parameter model in torch and in JAX (~70 s, ~5 GB on 2 cores).
def test_matches_transformers_at_vit_l_shape():
  """ViT-L/14's shape (24 layers, 1024 wide, 16 heads, 37 x 37 position grid) on 2 photos of
  112 px: an 8 x 8 grid, position embeddings resampled from 37 x 37."""
  net = feature_nets.torch_dinov2(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=518, patch_size=14)
  cfg = dinov2_weights.dinov2_config_from_hf(net.config.to_dict())
  assert cfg == dinov2.VARIANTS["vitl14"]
  pixels = feature_nets.photos(112)[:2]
  ref = _reference(net, pixels)
  params = dinov2_weights.dinov2_params_from_hf(
      {k: v.numpy() for k, v in net.state_dict().items()}, cfg)
  del net
  params = {k: jnp.asarray(v) for k, v in params.items()}
  out = jax.jit(lambda p, x: dinov2.dinov2_features(p, cfg, x))(params, pixels)
  assert out.patches.shape == (2, 8, 8, 1024)
  _assert_matches(out, ref, 0)


def test_bfloat16_compute_is_close_to_float32(small):
  params, cfg = frozen_weights.load_dinov2_params(small[1])
  pixels = _images()["resampled"]
  features = jax.jit(lambda p, x, dtype: dinov2.dinov2_features(p, cfg, x, dtype=dtype),
                     static_argnums=2)
  ref = np.asarray(features(params, pixels, jnp.float32).patches)
  out = features(params, pixels, jnp.bfloat16).patches
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  # bfloat16 keeps 8 bits of mantissa in the matmuls; the stream and norms stay float32.
  err = np.abs(np.asarray(out) - ref).max()
  assert err < 0.1 * np.abs(ref).max(), err


def test_layer_norms_are_two_pass():
  cfg = dinov2.Dinov2Config(hidden_size=16, num_layers=2, num_heads=2, image_size=28)
  model = nnx.eval_shape(lambda: dinov2.Dinov2(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.LayerNorm)]
  assert len(norms) == 2 * cfg.num_layers + 1
  assert all(not n.use_fast_variance and n.dtype == jnp.float32 for n in norms)
  # Tokens whose mean dwarfs their spread: E[x^2] - E[x]^2 cancels to garbage in float32 (measured
  # ~2.5e3 off here); two passes are off by the rounding of the mean (measured 2.7e-4).
  x = 3e3 + np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)
  x64 = x.astype(np.float64)
  ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
  norm = nnx.merge(*nnx.split(norms[-1]))  # Abstract; give it real scale 1 and bias 0.
  norm.scale.value, norm.bias.value = jnp.ones(16), jnp.zeros(16)
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), ref, atol=2e-3)


def test_preprocess_is_lightningdit_resize():
  photos = feature_nets.photos(256)
  # LightningDiT: F.interpolate(x, size=(224, 224), mode='bilinear', align_corners=False). In
  # float64: on float32 input torch computes the sampling positions in float32 (off by up to
  # 2.5e-5 here); ours are exact.
  ref = F.interpolate(feature_nets.nchw(photos).double(), size=(224, 224), mode="bilinear",
                      align_corners=False).numpy().transpose(0, 2, 3, 1)
  out = np.asarray(dinov2.preprocess(jnp.asarray(photos), (16, 16)))
  assert out.shape == (3, 224, 224, 3)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
  imagenet = np.asarray(dinov2.preprocess(jnp.asarray(photos), (16, 16), normalize="imagenet"))
  want = ((ref + 1) / 2 - np.array(dinov2.IMAGENET_MEAN)) / np.array(dinov2.IMAGENET_STD)
  np.testing.assert_allclose(imagenet, want, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="imagenet"):
    dinov2.preprocess(jnp.asarray(photos), (16, 16), normalize="clip")


def _transformers_shapes(variant: dinov2.Dinov2Config) -> dict[str, tuple[int, ...]]:
  """{name: shape} of transformers' model of that size (its in-memory names; no mask token)."""
  kw = dict(hidden_size=variant.hidden_size, num_hidden_layers=variant.num_layers,
            num_attention_heads=variant.num_heads, image_size=518, patch_size=14,
            use_swiglu_ffn=variant.use_swiglu_ffn)
  with torch.device("meta"):  # Shapes only, nothing allocated.
    net = (transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**kw))
           if variant.num_register_tokens else
           transformers.Dinov2Model(transformers.Dinov2Config(**kw)))
  return {k: tuple(v.shape) for k, v in net.state_dict().items() if "mask_token" not in k}


def test_variants_are_the_released_architectures():
  """Each VARIANTS entry has exactly the tensors of transformers' model of that size (ViT-L/14:
  304,367,616 parameters without the mask token, as facebook/dinov2-large), and our params count
  the same."""
  hub = {".attention.q_proj.": ".attention.attention.query.",
         ".attention.k_proj.": ".attention.attention.key.",
         ".attention.v_proj.": ".attention.attention.value.",
         ".attention.o_proj.": ".attention.output.dense.",
         ".mlp.down_proj.": ".mlp.weights_out."}
  totals = {}
  for name, variant in dinov2.VARIANTS.items():
    theirs = {}
    for k, shape in _transformers_shapes(variant).items():
      for new, old in hub.items():
        k = k.replace(new, old)
      if ".mlp.up_proj." in k:  # The hub fuses [gate; up] into weights_in.
        continue
      if ".mlp.gate_proj." in k:
        k, shape = k.replace(".mlp.gate_proj.", ".mlp.weights_in."), (2 * shape[0], *shape[1:])
      theirs[k] = shape
    ours_hub = dinov2_weights.hf_shapes(variant)
    assert theirs == ours_hub, name
    totals[name] = sum(int(np.prod(s)) for s in ours_hub.values())
  assert totals["vitl14"] == 304_367_616 and totals["vitg14"] == 1_136_479_232
  for name in ("vits14", "vits14_reg"):
    ours = dinov2.dinov2_shapes(dinov2.VARIANTS[name])
    assert sum(int(np.prod(s)) for s in ours.values()) == totals[name]


# ------------------------------------------------------------------------------ bad input


def _one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(ConversionError) as e:
    fn(*args, **kwargs)
  message = str(e.value)
  assert "\n" not in message
  return message


def _copy_folder(src, dst, config=None, tensors=None):
  dst.mkdir()
  hf = json.loads((src / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({**hf, **(config or {})}))
  sd = safetensors_io.read_safetensors(str(src / "model.safetensors"))
  safetensors_io.write_safetensors(tensors(sd) if tensors else sd, str(dst / "model.safetensors"))
  return dst


def test_convert_refuses_bad_folders(small, tmp_path):
  hf, _ = small
  out = str(tmp_path / "out.safetensors")
  cases = {}
  cases["missing"] = (str(tmp_path / "nope"), "does not exist")
  cases["file"] = (str(hf / "config.json"), "is a file")
  (tmp_path / "empty").mkdir()
  cases["no config"] = (str(tmp_path / "empty"), "has no config.json")
  bad_json = tmp_path / "bad_json"
  bad_json.mkdir()
  (bad_json / "config.json").write_text("{nope")
  cases["bad json"] = (str(bad_json), "not valid JSON")
  vit = _copy_folder(hf, tmp_path / "vit", config={"model_type": "vit"})
  cases["other model"] = (str(vit), "describes a 'vit' model, not DINOv2")
  relu = _copy_folder(hf, tmp_path / "relu", config={"hidden_act": "relu"})
  cases["activation"] = (str(relu), "hidden_act='relu'")
  wide = _copy_folder(hf, tmp_path / "wide", config={"hidden_size": 64})
  cases["config vs weights"] = (str(wide), "embeddings.cls_token (1, 1, 48) (expected (1, 1, 64))")
  drop = lambda sd: {k: v for k, v in sd.items() if k != "encoder.layer.2.norm2.bias"}
  cut = _copy_folder(hf, tmp_path / "cut", tensors=drop)
  cases["missing tensor"] = (str(cut), "missing ['encoder.layer.2.norm2.bias']")
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text((hf / "config.json").read_text())
  torch.save({"a": torch.zeros(2)}, pickled / "pytorch_model.bin")
  cases["pickle only"] = (str(pickled), "only pickle-based ['pytorch_model.bin']")
  for name, (src, expected) in cases.items():
    msg = _one_line_error(dinov2_weights.convert_dinov2, src, out)
    assert expected in msg and src in msg, (name, msg)
    assert "transformers DINOv2 folder" in msg or name == "activation", (name, msg)
  assert not os.path.exists(out)


def test_convert_reads_sharded_folders(small, tmp_path):
  """A folder with model.safetensors.index.json and two shards converts like one file."""
  hf, _ = small
  sd = safetensors_io.read_safetensors(str(hf / "model.safetensors"))
  keys = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": keys[::2],
            "model-00002-of-00002.safetensors": keys[1::2]}
  root = tmp_path / "sharded"
  root.mkdir()
  (root / "config.json").write_text((hf / "config.json").read_text())
  for shard, names in shards.items():
    safetensors_io.write_safetensors({k: sd[k] for k in names}, str(root / shard))
  (root / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: s for s, names in shards.items() for k in names}}))
  dinov2_weights.convert_dinov2(str(root), str(tmp_path / "a.safetensors"))
  a, _ = frozen_weights.load_dinov2_params(str(tmp_path / "a.safetensors"))
  b, _ = frozen_weights.load_dinov2_params(small[1])
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
  os.remove(root / "model-00002-of-00002.safetensors")
  msg = _one_line_error(dinov2_weights.convert_dinov2, str(root), str(tmp_path / "b.safetensors"))
  assert "model-00002-of-00002.safetensors" in msg and "does not exist" in msg


def test_load_refuses_other_files(small, tmp_path):
  _, good = small
  params, cfg = frozen_weights.load_dinov2_params(good)
  lpips_file = feature_nets.tagged_file(tmp_path / "lpips.safetensors", frozen_weights.LPIPS_NET)
  untagged = tmp_path / "untagged.safetensors"
  safetensors_io.write_safetensors(params, str(untagged))
  no_config = tmp_path / "no_config.safetensors"
  safetensors_io.write_safetensors(params, str(no_config),
                                   metadata={frozen_weights.NET_KEY: frozen_weights.DINOV2_NET})
  wrong = tmp_path / "wrong.safetensors"
  other_cfg = json.dumps({**cfg.to_dict(), "hidden_size": 64})
  safetensors_io.write_safetensors(params, str(wrong), metadata={
      frozen_weights.NET_KEY: frozen_weights.DINOV2_NET, frozen_weights.CONFIG_KEY: other_cfg})
  pickled = tmp_path / "dinov2.pth"
  torch.save({"a": torch.zeros(2)}, pickled)
  cases = {str(tmp_path / "missing.safetensors"): "does not exist",
           str(pickled): "pickle", lpips_file: "lpips_vgg_v0.1",
           str(untagged): "no 'vae_scale_net'",
           str(no_config): "no readable 'dinov2_config'",
           str(wrong): "cls_token (48,) (expected (64,))"}
  for path, expected in cases.items():
    msg = _one_line_error(frozen_weights.load_dinov2_params, path)
    assert path in msg and expected in msg, msg
    assert "python -m vae_scale.convert dinov2 --src=DIR --out=" in msg, msg
  # The other loaders refuse a DINOv2 file the same way.
  assert "'dinov2'" in _one_line_error(frozen_weights.load_lpips_params, good)


def test_convert_command(small, tmp_path):
  hf, _ = small
  out = str(tmp_path / "d.safetensors")
  line = convert.run_feature_net("dinov2", out, src=str(hf))
  assert f"--config.loss.vf_weights={out}" in line and "width 48" in line
  with pytest.raises(Exception, match="dinov2 needs --src=DIR"):
    convert.run_feature_net("dinov2", out)


@pytest.mark.slow  # Starts a `python -m vae_scale.convert` process.
def test_convert_command_line_mistake_is_one_line(tmp_path):
  res = subprocess.run([sys.executable, "-m", "vae_scale.convert", "dinov2",
                        f"--src={tmp_path / 'nope'}", f"--out={tmp_path / 'x.safetensors'}"],
                       cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                       text=True, timeout=300)
  errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert res.returncode == 2 and len(errors) == 1 and "nope does not exist" in errors[0], res.stderr
  assert not (tmp_path / "x.safetensors").exists()
