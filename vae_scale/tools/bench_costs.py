"""What a train step costs, apart from running it: analytic FLOPs, XLA's cost and memory analyses,
activation bytes, and the peak FLOP/s of known devices (for MFU). Used by `bench_step`."""

from __future__ import annotations

import importlib.metadata
import math
import platform
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vae_scale.training import losses
from vae_scale.models import AutoencoderConfig
from vae_scale.models import AutoencoderKL

# Dense peak TFLOP/s per device: (lower-case substring of device_kind, bfloat16, float32). float32
# on NVIDIA Ampere/Hopper is the TF32 tensor-core peak (JAX's default precision lets XLA use TF32 for
# float32 convolutions and matmuls); TPUs run float32 matmuls as bfloat16 passes at default precision.
# First match wins, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756.0, 378.0),
    ("h100", 989.0, 494.7),  # SXM (device_kind "NVIDIA H100 80GB HBM3").
    ("h200", 989.0, 494.7),
    ("gh200", 989.0, 494.7),
    ("h800", 989.0, 494.7),
    ("a100", 312.0, 156.0),
    ("l4", 121.0, 60.0),
    ("tpu v4", 275.0, 275.0),
    ("tpu v5 lite", 197.0, 197.0),  # v5e.
    ("tpu v5e", 197.0, 197.0),
    ("tpu v5p", 459.0, 459.0),
    ("tpu v5", 459.0, 459.0),  # v5p reports "TPU v5".
    ("tpu v6 lite", 918.0, 918.0),  # v6e (Trillium).
    ("tpu v6e", 918.0, 918.0),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The table's dense peak TFLOP/s of one device for `dtype`, or None (CPU, unknown devices)."""
  kind = device_kind.lower()
  for name, bf16, f32 in PEAK_TFLOPS:
    if name in kind:
      return bf16 if dtype == "bfloat16" else f32
  return None


def analytic_forward_macs(cfg: AutoencoderConfig) -> dict[str, int]:
  """Multiply-accumulates of one image's forward pass through convolutions and attention matmuls.

  An independent count (from the architecture, not from XLA) to cross-check XLA's cost analysis;
  normalization, activations and the loss are not counted. For KL-f8 at 256²: encoder 136.4 G,
  decoder 311.1 G.

  Returns:
    {'encoder', 'decoder', 'quant', 'total'} in MACs per image.
  """
  def conv(k: int, cin: int, cout: int, res: int) -> int:
    return k * k * cin * cout * res * res

  def resnet(cin: int, cout: int, res: int) -> int:
    return (conv(3, cin, cout, res) + conv(3, cout, cout, res) +
            (conv(1, cin, cout, res) if cin != cout else 0))

  def attn(c: int, res: int) -> int:
    n = res * res
    return 4 * n * c * c + 2 * n * n * c  # q, k, v, out projections; q.k and weights.v.

  widths = [cfg.ch * m for m in cfg.ch_mult]
  moments = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
  enc, res, cin = conv(3, cfg.in_channels, cfg.ch, cfg.resolution), cfg.resolution, cfg.ch
  for level, cout in enumerate(widths):
    for i in range(cfg.num_res_blocks):
      enc += resnet(cin if i == 0 else cout, cout, res)
      enc += attn(cout, res) if res in cfg.attn_resolutions else 0
    cin = cout
    if level < len(widths) - 1:
      res //= 2
      enc += conv(3, cout, cout, res)
  mid = 2 * resnet(widths[-1], widths[-1], res) + (attn(widths[-1], res) if cfg.mid_attention else 0)
  enc += mid + conv(3, widths[-1], moments, res)

  dec = conv(3, cfg.z_channels, widths[-1], res) + mid
  cin = widths[-1]
  for level, cout in enumerate(widths[::-1]):
    for i in range(cfg.num_res_blocks + 1):
      dec += resnet(cin if i == 0 else cout, cout, res)
      dec += attn(cout, res) if res in cfg.attn_resolutions else 0
    cin = cout
    if level < len(widths) - 1:
      res *= 2
      dec += conv(3, cout, cout, res)
  dec += conv(3, widths[0], cfg.out_channels, res)
  latent = cfg.resolution // 2 ** (len(widths) - 1)
  quant = (conv(1, moments, moments, latent) if cfg.double_z else 0) + conv(
      1, cfg.z_channels, cfg.z_channels, latent)
  return {"encoder": enc, "decoder": dec, "quant": quant, "total": enc + dec + quant}


def analytic_train_flops_per_image(cfg: AutoencoderConfig) -> float:
  """≈ 6 x forward MACs: 2 FLOPs per MAC, times forward + input gradient + weight gradient."""
  return 6.0 * analytic_forward_macs(cfg)["total"]


def model_flops(xla_count: float | None, analytic: float) -> tuple[float, str]:
  """The FLOPs that MFU credits to a step: XLA's count of the step without remat, or `analytic`
  (the autoencoder's count) where XLA's is missing or under half of it. On GPU the convolutions are
  cuDNN custom calls that XLA's cost analysis does not count (ldm_f8 on an H100: 20 of 2,656
  GFLOP per image). Returns (FLOPs, 'xla' | 'analytic')."""
  if xla_count and xla_count >= 0.5 * analytic:
    return xla_count, "xla"
  return analytic, "analytic"


def activation_bytes_per_image(config: ml_collections.ConfigDict) -> int:
  """Bytes per image that the autoencoder's forward pass and loss keep for the backward pass.

  JAX's residuals of the loss's VJP (traced, nothing compiled or allocated), at batch 2 minus batch
  1 so that the weights drop out: what `model.remat` trades for recomputation. XLA may still fuse
  some away or (on GPU/TPU under memory pressure) rematerialize more; the CPU compiler's buffer
  assignment does not show the saving, so this is the platform-independent measure.
  """
  model_cfg = AutoencoderConfig.from_config(config)
  size = config.image_size

  def residual_bytes(batch: int) -> int:
    def vjp_fn(x):
      graphdef, params = nnx.split(AutoencoderKL(model_cfg, rngs=nnx.Rngs(0)))

      def loss(p):
        recon, post, _ = nnx.merge(graphdef, p).forward_with_features(x, jax.random.key(0))
        return losses.autoencoder_loss(x, recon, post, l1_weight=1.0, ssim_weight=1.0,
                                       kl_weight=1.0)[0]
      return jax.vjp(loss, params)[1]
    shapes = jax.eval_shape(vjp_fn, jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(shapes))

  return residual_bytes(2) - residual_bytes(1)


def _cost(analysis: Any) -> dict[str, float]:
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def xla_flops(stage: Any) -> float | None:
  """FLOPs of one device's program, from XLA's cost analysis of a Lowered or Compiled stage."""
  try:
    flops = _cost(stage.cost_analysis()).get("flops")
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return None
  return float(flops) if flops is not None else None


def xla_memory(compiled: Any) -> dict[str, int] | None:
  """XLA's buffer sizes of one device's program; `total` = arguments + outputs - aliased + temps."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def device_peak_bytes(device: Any) -> int | None:
  """The runtime's peak bytes in use on `device` since the process started (None on CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def versions(packages: tuple[str, ...] = ("jax", "jaxlib", "flax", "optax")) -> dict[str, str]:
  """Python's and `packages`' installed versions (distribution names), for benchmark reports."""
  out = {"python": platform.python_version()}
  for name in packages:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out
