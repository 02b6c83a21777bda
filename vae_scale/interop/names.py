"""Parameter names and tensor layouts: vae_scale <-> diffusers <-> original LDM / SD.

vae_scale parameter paths already follow diffusers (`encoder.down_blocks.0.resnets.0.conv1`), so
vae_scale <-> diffusers is a join of the path plus layout changes: conv kernels HWIO <-> torch OIHW,
linear kernels [in, out] <-> torch [out, in], GroupNorm scale <-> weight. The original LDM names
differ more (`encoder.down.0.block.0`, `mid.attn_1.q` as 1x1 convs, and a decoder `up.{level}` whose
index counts resolution levels, so LDM `up.3` is diffusers `up_blocks.0`). One table of
(diffusers, LDM) pairs, read left to right or right to left, serves both directions.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np

Params = dict  # A pure nested dict (int keys for lists), as nnx.to_pure_dict returns.

# (diffusers prefix, LDM prefix) inside `encoder.` / `decoder.`. Index placeholders: {i} and {j}
# are the same number on both sides; {r} is a decoder level, counted from the other end on the other
# side (n - 1 - r, its own inverse); {p} is a diffusers mid-block index, one more in LDM.
_BLOCK_PAIRS = (
    ("down_blocks.{i}.resnets.{j}.", "down.{i}.block.{j}."),
    ("down_blocks.{i}.attentions.{j}.", "down.{i}.attn.{j}."),
    ("down_blocks.{i}.downsamplers.0.", "down.{i}.downsample."),
    ("up_blocks.{r}.resnets.{j}.", "up.{r}.block.{j}."),
    ("up_blocks.{r}.attentions.{j}.", "up.{r}.attn.{j}."),
    ("up_blocks.{r}.upsamplers.0.", "up.{r}.upsample."),
    ("mid_block.resnets.{p}.", "mid.block_{p}."),
    ("mid_block.attentions.0.", "mid.attn_1."),
    ("conv_norm_out.", "norm_out."),
)
# Inside an attention block (diffusers, LDM), and the ResNet shortcut anywhere.
_ATTENTION_PAIRS = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                    ("to_out.0.", "proj_out."))
_SHORTCUT_PAIR = ("conv_shortcut", "nin_shortcut")
# diffusers checkpoints saved before diffusers 0.14 use older attention names (old, current).
_LEGACY_ATTENTION_PAIRS = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."),
                           ("proj_attn.", "to_out.0."))


def _pattern(template: str) -> re.Pattern:
  escaped = re.escape(template)
  for name in "ijrp":
    escaped = escaped.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
  return re.compile("^" + escaped)


def _index(name: str, value: int, to_ldm: bool, num_levels: int) -> int:
  if name == "r":
    return num_levels - 1 - value
  if name == "p":
    return value + 1 if to_ldm else value - 1
  return value


def _swap(rest: str, pairs: Iterable[tuple[str, str]], to_second: bool) -> str:
  for first, second in pairs:
    src, dst = (first, second) if to_second else (second, first)
    if rest.startswith(src):
      return dst + rest[len(src):]
  return rest


def _translate(key: str, num_levels: int, to_ldm: bool) -> str:
  m = re.match(r"^(encoder|decoder)\.(.*)$", key)
  if not m:
    return key  # quant_conv / post_quant_conv: the same in both.
  part, rest = m.groups()
  for diffusers, ldm in _BLOCK_PAIRS:
    src, dst = (diffusers, ldm) if to_ldm else (ldm, diffusers)
    mm = _pattern(src).match(rest)
    if mm:
      values = {k: _index(k, int(v), to_ldm, num_levels) for k, v in mm.groupdict().items()}
      tail = rest[mm.end():]
      if ".attn" in ldm or "attentions" in diffusers:
        tail = _swap(tail, _ATTENTION_PAIRS, to_ldm)
      rest = dst.format(**values) + tail
      break
  old, new = _SHORTCUT_PAIR if to_ldm else _SHORTCUT_PAIR[::-1]
  return f"{part}.{rest.replace(old, new)}"


def ldm_name(key: str, num_levels: int) -> str:
  """The original LDM / SD name of a diffusers VAE key (`num_levels` = len(ch_mult))."""
  return _translate(key, num_levels, to_ldm=True)


def diffusers_name_from_ldm(key: str, num_levels: int) -> str:
  """The diffusers key of an original LDM / SD VAE key (inverse of `ldm_name`)."""
  return _translate(key, num_levels, to_ldm=False)


def legacy_diffusers_name(key: str) -> str:
  """A pre-0.14 diffusers attention key (`query`, `proj_attn`, ...) in today's names."""
  m = re.match(r"^(.*\.attentions\.\d+\.)(.*)$", key)
  return m.group(1) + _swap(m.group(2), _LEGACY_ATTENTION_PAIRS, True) if m else key


def diffusers_name(path: tuple) -> str:
  """The diffusers state-dict key of a vae_scale parameter path.

  ('encoder', 'down_blocks', 0, 'resnets', 0, 'norm1', 'norm', 'scale') -> 'encoder.down_blocks.0.
  resnets.0.norm1.weight'. GroupNorm's inner `norm` disappears; attention `to_out` is `to_out.0`.
  """
  parts = []
  for i, p in enumerate(path[:-1]):
    if p == "norm" and i == len(path) - 2:
      continue
    parts.extend(["to_out", "0"] if p == "to_out" else [str(p)])
  parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]])
  return ".".join(parts)


# --------------------------------------------------------------------------- trees


def flatten(tree: Params, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
  """(path, leaf) pairs of a nested dict, in a stable order (ints before strings)."""
  out = []
  for key in sorted(tree, key=lambda k: (isinstance(k, str), k)):
    value = tree[key]
    if isinstance(value, dict):
      out.extend(flatten(value, prefix + (key,)))
    else:
      out.append((prefix + (key,), value))
  return out


def unflatten(items: Iterable[tuple[tuple, Any]]) -> Params:
  """The nested dict of (path, leaf) pairs."""
  root: dict = {}
  for path, value in items:
    node = root
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return root


_ROOT_ORDER = {"encoder": 0, "quant_conv": 1, "post_quant_conv": 2, "decoder": 3}


def model_order(items: list[tuple[tuple, Any]]) -> list[tuple[tuple, Any]]:
  """Encoder, quant_conv, post_quant_conv, decoder: the order errors list mismatches in."""
  return sorted(items, key=lambda item: _ROOT_ORDER.get(item[0][0], 9))


# --------------------------------------------------------------------------- layouts


def to_torch_layout(value: np.ndarray, ldm: bool = False) -> np.ndarray:
  """A vae_scale array in torch's layout (OIHW convs, [out, in] linears; LDM: 1x1 convs)."""
  value = np.asarray(value)
  if value.ndim == 4:  # Conv kernel HWIO -> OIHW.
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if value.ndim == 2:  # Linear kernel [in, out] -> [out, in]; LDM stores 1x1 convs.
    out = np.ascontiguousarray(value.T)
    return out[:, :, None, None] if ldm else out
  return np.require(value, requirements="C")


def torch_shape(shape: tuple, ldm: bool = False) -> tuple:
  """The torch shape of a vae_scale array shape (see `to_torch_layout`)."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0]) + ((1, 1) if ldm else ())
  return tuple(shape)


def from_torch_layout(value: np.ndarray, target_ndim: int) -> np.ndarray:
  """A torch array in vae_scale's layout; a 1x1 conv becomes a linear kernel if target_ndim == 2."""
  value = np.asarray(value)
  if target_ndim == 2 and value.ndim > 2:  # A 1x1 conv (LDM attention) used as a linear layer.
    value = value.reshape(value.shape[:2])
  if value.ndim == 4:
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if value.ndim == 2:
    return np.ascontiguousarray(value.T)
  return np.require(value, requirements="C")


def to_diffusers_state_dict(params: Params) -> dict[str, np.ndarray]:
  """vae_scale params -> a diffusers `AutoencoderKL` state dict (numpy, torch layouts)."""
  return {diffusers_name(path): to_torch_layout(v) for path, v in flatten(params)}


def to_ldm_state_dict(params: Params) -> dict[str, np.ndarray]:
  """vae_scale params -> an original LDM / SD VAE state dict (numpy; attention as 1x1 convs)."""
  n = len(params["encoder"]["down_blocks"])
  return {ldm_name(diffusers_name(path), n): to_torch_layout(v, ldm=v.ndim == 2)
          for path, v in flatten(params)}


# --------------------------------------------------------------------------- whole state dicts

_LDM_PREFIXES = ("first_stage_model.", "vae.")  # A full SD checkpoint nests the VAE under these.
_VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _is_ldm(keys: Iterable[str]) -> bool:
  return any(re.match(r"^(encoder|decoder)\.(down|up|mid|norm_out)\.", k) for k in keys)


def _strip_ldm_prefix(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  for prefix in _LDM_PREFIXES:
    if any(k.startswith(prefix + "encoder.") for k in state_dict):
      return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  return state_dict


def normalize_state_dict(state_dict: dict[str, np.ndarray]
                         ) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
  """Any supported VAE state dict -> (diffusers-named dict, {new key: file key}, 'ldm'|'diffusers').

  Strips a full SD checkpoint's `first_stage_model.` prefix and drops what isn't the VAE
  (UNet, text encoder, `loss.*` discriminator weights); renames LDM and old diffusers names.
  """
  sd = _strip_ldm_prefix(state_dict)
  if _is_ldm(sd):
    sd = {k: v for k, v in sd.items() if k.startswith(_VAE_ROOTS)}
    ups = [int(m.group(1)) for k in sd for m in [re.match(r"^decoder\.up\.(\d+)\.", k)] if m]
    n = max(ups) + 1 if ups else 0
    out, names = {}, {}
    for k, v in sd.items():
      new = diffusers_name_from_ldm(k, n)
      out[new], names[new] = v, k
    return out, names, "ldm"
  out, names = {}, {}
  for k, v in sd.items():
    new = legacy_diffusers_name(k)
    out[new] = v
    if new != k:
      names[new] = k
  return out, names, "diffusers"
