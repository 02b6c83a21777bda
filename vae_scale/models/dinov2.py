"""DINOv2 (ViT-S/B/L/G /14, with or without registers) in Flax NNX, NHWC, equal to `transformers`.

The network is transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (the weights of
facebook/dinov2-{small,base,large,giant}[-with-registers] are the same as timm's and torch hub's):
a 14x14 stride-14 conv patch embedding; a CLS token; learned position embeddings for a square grid
of image_size / 14 patches (37 x 37 for the released 518 px models) resampled to the input's grid
bicubically; register tokens inserted after CLS (no position embedding); pre-norm blocks
x + ls1 * attn(norm1(x)), x + ls2 * mlp(norm2(x)) with per-channel layer scale; an exact-erf GELU
MLP (4x wide), or for giant a SwiGLU MLP (silu(gate) * up, 2/3 of 4x rounded up to a multiple of 8);
a final LayerNorm (eps 1e-6).

Position embeddings are resampled like `torch.nn.functional.interpolate(mode='bicubic',
align_corners=False)` (`vae_scale.models.resample`), without antialias in transformers'
`Dinov2Model` and with it in `Dinov2WithRegistersModel` and in timm (`Dinov2Config.pos_antialias`).

bf16-safe: the residual stream, the layer norms (two-pass variance), layer scale and the attention
softmax are float32; only the matmuls and convs run in `dtype`.

Images: LightningDiT's VA-VAE (vavae/ldm/models/foundation_models.py) feeds DINOv2 the training
batch as it is, in [-1, 1] (no ImageNet mean / std), resized bilinearly (align_corners=False, no
antialias) to 224 x 224 for 256 px images, so the 16 x 16 patch grid matches its f16 latents; it
uses timm's `vit_large_patch14_dinov2.lvd142m` (ViT-L/14 without registers) whose position
embeddings are resampled with antialias. `preprocess` does exactly that for any grid;
`normalize='imagenet'` gives DINOv2's usual input instead ((x + 1) / 2 - mean) / std.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vae_scale.models import resample
from vae_scale.models.lpips import flat_state
from vae_scale.models.lpips import merge_split

Array = jax.Array
Params = Mapping[str, Any]  # Flat {"layers.0.attn.query.kernel": [C, C], ...}.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("none", "imagenet")


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """The architecture (transformers' Dinov2Config / Dinov2WithRegistersConfig fields).

  Attributes:
    hidden_size: token width C (384 S, 768 B, 1024 L, 1536 G).
    num_layers: blocks (12, 12, 24, 40).
    num_heads: attention heads (6, 12, 16, 24); head width C / heads.
    mlp_ratio: MLP width / C (4).
    patch_size: 14.
    image_size: the image size the position embeddings were trained for (518: a 37 x 37 grid).
    num_register_tokens: 0, or 4 for the *-with-registers models.
    use_swiglu_ffn: SwiGLU MLP (giant).
    layer_norm_eps: 1e-6.
    qkv_bias: biases on q, k, v (True).
    pos_antialias: resample position embeddings with antialias (transformers: False for
      Dinov2Model, True with registers; timm and so LightningDiT: True).
  """

  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  patch_size: int = 14
  image_size: int = 518
  num_register_tokens: int = 0
  use_swiglu_ffn: bool = False
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  pos_antialias: bool = False

  @property
  def pos_grid(self) -> int:
    """Side of the square grid the position embeddings were trained on."""
    return self.image_size // self.patch_size

  @property
  def mlp_hidden(self) -> int:
    hidden = int(self.hidden_size * self.mlp_ratio)
    if self.use_swiglu_ffn:  # transformers' Dinov2SwiGLUFFN: 2/3, rounded up to a multiple of 8.
      hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Dinov2Config":
    """From `to_dict`'s output; unknown keys raise ValueError (naming them)."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
      raise ValueError(f"unknown Dinov2Config fields {unknown}")
    return cls(**d)


# The released checkpoints (facebook/dinov2-* on the Hugging Face hub; registers: 4 tokens).
VARIANTS = {
    "vits14": Dinov2Config(hidden_size=384, num_layers=12, num_heads=6),
    "vitb14": Dinov2Config(hidden_size=768, num_layers=12, num_heads=12),
    "vitl14": Dinov2Config(hidden_size=1024, num_layers=24, num_heads=16),
    "vitg14": Dinov2Config(hidden_size=1536, num_layers=40, num_heads=24, use_swiglu_ffn=True),
}
VARIANTS.update({f"{k}_reg": dataclasses.replace(v, num_register_tokens=4, pos_antialias=True)
                 for k, v in list(VARIANTS.items())})


class Dinov2Output(NamedTuple):
  """Tokens after the final LayerNorm, float32.

  Attributes:
    patches: [B, h, w, C] patch tokens on the input's patch grid (row-major, as transformers').
    cls: [B, C] the CLS token (transformers' pooler_output).
    registers: [B, R, C] register tokens (R = 0 without registers).
  """

  patches: Array
  cls: Array
  registers: Array


def _layer_norm(c: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance (mean of squared deviations): E[x^2] - E[x]^2 cancels on tokens whose mean
  # dwarfs their spread. float32 whatever the compute dtype.
  return nnx.LayerNorm(c, epsilon=eps, use_fast_variance=False, dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention; logits and softmax in float32."""

  def __init__(self, cfg: Dinov2Config, dtype: Any, precision: Any, *, rngs: nnx.Rngs):
    c = cfg.hidden_size
    self.num_heads = cfg.num_heads
    self.dtype = dtype
    self.precision = precision
    linear = lambda bias: nnx.Linear(c, c, use_bias=bias, dtype=dtype, precision=precision,
                                     rngs=rngs)
    self.query, self.key, self.value = linear(cfg.qkv_bias), linear(cfg.qkv_bias), linear(
        cfg.qkv_bias)
    self.out = linear(True)

  def __call__(self, x: Array) -> Array:
    """[B, T, C] -> [B, T, C] in `dtype`."""
    b, t, c = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, c // self.num_heads)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (c // self.num_heads) ** -0.5, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v, precision=self.precision)
    return self.out(out.reshape(b, t, c))


class Mlp(nnx.Module):
  """fc2(gelu(fc1(x))) with the exact (erf) GELU, or SwiGLU down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: Dinov2Config, dtype: Any, precision: Any, *, rngs: nnx.Rngs):
    c, hidden = cfg.hidden_size, cfg.mlp_hidden
    linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, precision=precision, rngs=rngs)
    self.swiglu = cfg.use_swiglu_ffn
    if self.swiglu:
      self.gate, self.up, self.down = linear(c, hidden), linear(c, hidden), linear(hidden, c)
    else:
      self.fc1, self.fc2 = linear(c, hidden), linear(hidden, c)

  def __call__(self, x: Array) -> Array:
    if self.swiglu:
      return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """x + ls1 * attn(norm1(x)); x + ls2 * mlp(norm2(x)); the stream and scales in float32."""

  def __init__(self, cfg: Dinov2Config, dtype: Any, precision: Any, *, rngs: nnx.Rngs):
    c = cfg.hidden_size
    self.dtype = dtype
    self.norm1 = _layer_norm(c, cfg.layer_norm_eps, rngs)
    self.attn = Attention(cfg, dtype, precision, rngs=rngs)
    self.layer_scale1 = nnx.Param(jnp.ones((c,), jnp.float32))
    self.norm2 = _layer_norm(c, cfg.layer_norm_eps, rngs)
    self.mlp = Mlp(cfg, dtype, precision, rngs=rngs)
    self.layer_scale2 = nnx.Param(jnp.ones((c,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    """[B, T, C] float32 -> [B, T, C] float32."""
    h = self.attn(self.norm1(x).astype(self.dtype)).astype(jnp.float32)
    x = x + self.layer_scale1[...] * h
    h = self.mlp(self.norm2(x).astype(self.dtype)).astype(jnp.float32)
    return x + self.layer_scale2[...] * h


class Dinov2(nnx.Module):
  """The DINOv2 backbone: normalised images [B, H, W, 3] -> tokens after the final norm.

  Parameter names (flat, see `dinov2_shapes`): patch_embed.{kernel [14, 14, 3, C], bias},
  cls_token [C], register_tokens [R, C] (with registers), position_embeddings [1 + g*g, C],
  layers.{i}.{norm1,norm2}.{scale,bias}, layers.{i}.attn.{query,key,value,out}.{kernel [C, C],
  bias}, layers.{i}.layer_scale{1,2} [C], layers.{i}.mlp.{fc1,fc2 | gate,up,down}.{kernel, bias},
  norm.{scale,bias}.
  """

  def __init__(self, cfg: Dinov2Config, *, dtype: Any = jnp.float32, precision: Any = None,
               rngs: nnx.Rngs):
    """Builds the network with random weights (use `dinov2_model` for real ones).

    Args:
      cfg: the architecture.
      dtype: compute dtype of the matmuls and the patch conv (parameters stay float32).
      precision: `jax.lax.Precision` of those; None follows `jax.default_matmul_precision`.
      rngs: initialisation keys.
    """
    c, p = cfg.hidden_size, cfg.patch_size
    self.config = cfg
    self.dtype = dtype
    self.patch_embed = nnx.Conv(3, c, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                                precision=precision, rngs=rngs)
    init = nnx.initializers.truncated_normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (c,)))
    if cfg.num_register_tokens:
      self.register_tokens = nnx.Param(init(rngs.params(), (cfg.num_register_tokens, c)))
    self.position_embeddings = nnx.Param(init(rngs.params(), (1 + cfg.pos_grid ** 2, c)))
    self.layers = nnx.List([Block(cfg, dtype, precision, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.norm = _layer_norm(c, cfg.layer_norm_eps, rngs)

  def position_embedding(self, grid: tuple[int, int]) -> Array:
    """[1 + h*w, C] float32: CLS's entry, then the patch grid's resampled to (h, w)."""
    cfg = self.config
    table = self.position_embeddings[...].astype(jnp.float32)
    patch = table[1:].reshape(cfg.pos_grid, cfg.pos_grid, -1)
    if grid != (cfg.pos_grid, cfg.pos_grid):
      patch = resample.resize(patch, grid, "bicubic", antialias=cfg.pos_antialias, axes=(0, 1))
    return jnp.concatenate([table[:1], patch.reshape(grid[0] * grid[1], -1)], axis=0)

  def __call__(self, pixels: Array) -> Dinov2Output:
    """Tokens of normalised images.

    Args:
      pixels: [B, H, W, 3] as the checkpoint expects them (see `preprocess`); H and W are
        multiples of 14 (a remainder is dropped, as transformers' conv does).

    Returns:
      `Dinov2Output` with patches [B, H/14, W/14, C], cls [B, C], registers [B, R, C], float32.
    """
    b = pixels.shape[0]
    cfg = self.config
    x = self.patch_embed(pixels.astype(self.dtype)).astype(jnp.float32)
    grid = (x.shape[1], x.shape[2])
    x = x.reshape(b, grid[0] * grid[1], cfg.hidden_size)
    cls = jnp.broadcast_to(self.cls_token[...].astype(jnp.float32), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding(grid)[None]
    if cfg.num_register_tokens:
      reg = jnp.broadcast_to(self.register_tokens[...].astype(jnp.float32),
                             (b, cfg.num_register_tokens, cfg.hidden_size))
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    for layer in self.layers:
      x = layer(x)
    x = self.norm(x)
    first = 1 + cfg.num_register_tokens
    return Dinov2Output(patches=x[:, first:].reshape(b, *grid, cfg.hidden_size), cls=x[:, 0],
                        registers=x[:, 1:first])


def preprocess(images: Array, grid: tuple[int, int], *, patch_size: int = 14,
               normalize: str = "none") -> Array:
  """Images as LightningDiT's VA-VAE hands them to DINOv2, for a `grid` of patches.

  Bilinear resize (torch's, align_corners=False, no antialias) to grid * patch_size; LightningDiT
  resizes 256 px images to 224 px, a 16 x 16 grid, the f16 latent grid. It keeps the [-1, 1] range
  of the training batch (normalize='none'); 'imagenet' maps to [0, 1] and applies ImageNet's mean
  and std, DINOv2's own preprocessing.

  Args:
    images: [B, H, W, 3] in [-1, 1].
    grid: (h, w) patches wanted (the latent grid).
    patch_size: 14.
    normalize: 'none' (LightningDiT) or 'imagenet'.

  Returns:
    [B, h * patch_size, w * patch_size, 3] float32.
  """
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {normalize!r}")
  x = resample.resize(images.astype(jnp.float32), (grid[0] * patch_size, grid[1] * patch_size),
                      "bilinear")
  if normalize == "imagenet":
    x = ((x + 1.0) * 0.5 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return x


@functools.lru_cache(maxsize=8)
def _skeleton(cfg: Dinov2Config, dtype: Any, precision: Any) -> tuple[Any, nnx.State]:
  """(graphdef, abstract state) of `Dinov2(cfg)`, built once per process: tracing the
  construction of a deep network takes seconds (flax checks each RNG draw against the whole
  trace so far, so it grows with the square of the depth: ~5 s for ViT-L, ~20 s for giant)."""
  return nnx.split(nnx.eval_shape(
      lambda: Dinov2(cfg, dtype=dtype, precision=precision, rngs=nnx.Rngs(0))))


def dinov2_shapes(cfg: Dinov2Config) -> dict[str, tuple[int, ...]]:
  """{name: shape} of the params of `Dinov2(cfg)` (nothing allocated)."""
  return {k: tuple(v.shape) for k, v in flat_state(_skeleton(cfg, jnp.float32, None)[1]).items()}


def dinov2_model(params: Params, cfg: Dinov2Config, *, dtype: Any = jnp.float32,
                 precision: Any = None) -> Dinov2:
  """A `Dinov2` holding `params` (from `load_dinov2_params`); callable inside jit.

  Raises:
    ValueError: a name is missing or unknown, or a shape differs from `cfg`'s.
  """
  graphdef, state = _skeleton(cfg, dtype, precision)
  return merge_split(graphdef, state, params, f"Dinov2 (width {cfg.hidden_size})")


def dinov2_features(params: Params, cfg: Dinov2Config, pixels: Array, *,
                    dtype: Any = jnp.float32, precision: Any = None) -> Dinov2Output:
  """The pure form a jitted loss calls with frozen params: `Dinov2(cfg)(pixels)`.

  Args:
    params: flat dict from `vae_scale.interop.dinov2_weights.load_dinov2_params`.
    cfg: the architecture stored with them.
    pixels: [B, H, W, 3], already preprocessed (`preprocess`).
    dtype: compute dtype of the matmuls (bfloat16 is fine); outputs are float32.
    precision: matmul precision.
  """
  return dinov2_model(params, cfg, dtype=dtype, precision=precision)(pixels)
