"""Checks a config once, up front, so mistakes surface as one clear line before anything compiles."""

from __future__ import annotations

from typing import Any

import ml_collections


from vae_scale.errors import ConfigError

# Every field a config may have, with its type. A field missing here is unknown (a typo, or a
# field of another version) and is rejected rather than silently ignored.
_INT, _FLOAT, _STR, _BOOL, _TUPLE = int, (int, float), str, bool, (tuple, list)
SCHEMA: dict[str, Any] = {
    "seed": _INT,
    "image_size": _INT,
    "model.in_channels": _INT,
    "model.out_channels": _INT,
    "model.ch": _INT,
    "model.ch_mult": _TUPLE,
    "model.num_res_blocks": _INT,
    "model.attn_resolutions": _TUPLE,
    "model.mid_attention": _BOOL,
    "model.z_channels": _INT,
    "model.double_z": _BOOL,
    "model.norm_groups": _INT,
    "model.dropout": _FLOAT,
    "model.dtype": _STR,
    "model.remat": _STR,
    "disc.enabled": _BOOL,
    "disc.start_step": _INT,
    "disc.weight": _FLOAT,
    "disc.factor": _FLOAT,
    "disc.loss": _STR,
    "disc.n_layers": _INT,
    "disc.filters": _INT,
    "disc.norm": _STR,
    "disc.learning_rate": _FLOAT,
    "disc.b1": _FLOAT,
    "disc.b2": _FLOAT,
    "loss.l1_weight": _FLOAT,
    "loss.ssim_weight": _FLOAT,
    "loss.kl_weight": _FLOAT,
    "loss.kl_warmup_steps": _INT,
    "loss.l2_weight": _FLOAT,
    "loss.perceptual_weight": _FLOAT,
    "loss.lpips_weights": _STR,
    "loss.reduction": _STR,
    "optimizer.name": _STR,
    "optimizer.learning_rate": _FLOAT,
    "optimizer.b1": _FLOAT,
    "optimizer.b2": _FLOAT,
    "optimizer.weight_decay": _FLOAT,
    "optimizer.schedule": _STR,
    "optimizer.warmup_steps": _INT,
    "optimizer.grad_clip_norm": _FLOAT,
    "optimizer.max_consecutive_nonfinite": _INT,
    "optimizer.grad_accum_steps": _INT,
    "ema_decay": _FLOAT,
    "init_from": _STR,
    "freeze_encoder": _BOOL,
    "data.source": _STR,
    "data.path": _STR,
    "data.eval_path": _STR,
    "data.eval_fraction": _FLOAT,
    "data.tfds_name": _STR,
    "data.tfds_data_dir": _STR,
    "data.train_split": _STR,
    "data.eval_split": _STR,
    "data.image_key": _STR,
    "data.synthetic_size": _INT,
    "data.num_workers": _INT,
    "data.prefetch_batches": _INT,
    "data.max_pixels": _INT,
    "data.reduced_jpeg_decode": _BOOL,
    "global_batch_size": _INT,
    "num_train_steps": _INT,
    "log_every_steps": _INT,
    "eval_every_steps": _INT,
    "num_eval_images": _INT,
    "inception_weights": _STR,
    "image_every_steps": _INT,
    "checkpoint_every_steps": _INT,
    "max_checkpoints_to_keep": _INT,
    "profile_steps": _INT,
}

_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "block", "level"),
    "disc.loss": ("hinge", "vanilla"),
    "disc.norm": ("batch", "group"),
    "optimizer.name": ("adam", "adamw"),
    "optimizer.schedule": ("constant", "cosine"),
    "data.source": ("folder", "tfds", "synthetic", "samples"),
    "loss.reduction": ("mean", "ldm_sum"),
}
_NON_NEGATIVE = (
    "loss.l1_weight", "loss.ssim_weight", "loss.kl_weight", "loss.kl_warmup_steps",
    "loss.l2_weight", "loss.perceptual_weight",
    "disc.weight", "disc.factor", "disc.start_step", "optimizer.weight_decay",
    "optimizer.warmup_steps", "optimizer.grad_clip_norm", "model.dropout", "profile_steps",
    "data.num_workers", "data.prefetch_batches", "optimizer.max_consecutive_nonfinite",
)
_POSITIVE = (
    "optimizer.grad_accum_steps",
    "image_size", "model.in_channels", "model.out_channels", "model.ch", "model.num_res_blocks",
    "model.z_channels", "model.norm_groups", "disc.n_layers", "disc.filters",
    "optimizer.learning_rate", "disc.learning_rate", "data.synthetic_size", "data.max_pixels",
    "global_batch_size", "num_train_steps", "log_every_steps", "eval_every_steps",
    "num_eval_images", "image_every_steps", "checkpoint_every_steps", "max_checkpoints_to_keep",
)


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _fail(field: str, rule: str) -> None:
  raise ConfigError(f"config.{field}: {rule}")


def check_batch(global_batch_size: int, num_devices: int | None = None,
                num_processes: int | None = None, grad_accum_steps: int = 1) -> None:
  """The one check that a global batch splits evenly over the devices and the processes.

  A run resumes on any slice whose shares divide its global batch (the data position is global):
  on one that doesn't, this is the one line naming the nearest global batches that do.

  Args:
    global_batch_size: images per optimizer step.
    num_devices, num_processes: the counts it must split over (None: not checked).
    grad_accum_steps: micro-batches per step (optimizer.grad_accum_steps); each one must split
      over the devices too.
  Raises:
    ConfigError: one line, e.g. "config.global_batch_size: 12 is not divisible by the 8 devices;
      use a multiple of 8 (the nearest: 8 or 16)".
  """
  accum = max(int(grad_accum_steps), 1)
  for count, what in ((num_devices, "devices"), (num_processes, "processes")):
    if count is None:
      continue
    unit = count * accum
    if global_batch_size % unit:
      below = global_batch_size // unit * unit
      nearest = f"{below} or {below + unit}" if below else f"{unit}"
      times = (f" x {accum} micro-batches (optimizer.grad_accum_steps)" if accum > 1 else "")
      _fail("global_batch_size", f"{global_batch_size} is not divisible by the {count} "
            f"{what}{times}; use a multiple of {unit} (the nearest: {nearest})")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None,
             num_processes: int | None = None, *, training: bool = True) -> None:
  """Checks every field of a training config against its rule.

  Args:
    config: the run's config (see configs/ldm_f8.py for every field).
    num_devices: the global device count; when given, the global batch must split evenly.
    num_processes: the process count; likewise.
    training: also check what only training needs (LPIPS weights for loss.perceptual_weight > 0,
      init_from for freeze_encoder); evaluate and encode pass False.

  Raises:
    ConfigError: on the first broken rule, naming the field and the rule.
  """
  flat = _flatten(config)
  for name in sorted(flat):
    if name not in SCHEMA:
      _fail(name, "unknown field (misspelt? every field is listed in configs/ldm_f8.py)")
  for name in SCHEMA:
    if name not in flat:
      _fail(name, "missing (start from configs/ldm_f8.py and override fields)")
  for name, kind in SCHEMA.items():
    value = flat[name]
    if kind is _BOOL:
      ok = isinstance(value, bool)
    elif kind is _INT:
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is _FLOAT:
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
      ok = isinstance(value, kind)
    if not ok:
      _fail(name, f"must be of type {getattr(kind, '__name__', 'tuple')}, got {value!r}")
  for name, choices in _CHOICES.items():
    if flat[name] not in choices:
      _fail(name, f"{flat[name]!r} is not one of {', '.join(choices)}")
  for name in _NON_NEGATIVE:
    if flat[name] < 0:
      _fail(name, f"must be >= 0, got {flat[name]}")
  for name in _POSITIVE:
    if flat[name] <= 0:
      _fail(name, f"must be > 0, got {flat[name]}")

  m = config.model
  if not m.ch_mult or any((not isinstance(c, int)) or c <= 0 for c in m.ch_mult):
    _fail("model.ch_mult", f"must be a non-empty tuple of positive ints, got {tuple(m.ch_mult)}")
  factor = 2 ** (len(m.ch_mult) - 1)
  if config.image_size % factor:
    _fail("image_size", f"{config.image_size} is not divisible by the total downsampling "
          f"2**(len(model.ch_mult)-1) = {factor}")
  for mult in (1,) + tuple(m.ch_mult):
    if (m.ch * mult) % m.norm_groups:
      _fail("model.ch", f"level width {m.ch}*{mult} = {m.ch * mult} is not divisible by "
            f"model.norm_groups = {m.norm_groups}")
  if m.dropout >= 1:
    _fail("model.dropout", f"must be in [0, 1), got {m.dropout}")
  for name in ("optimizer.b1", "optimizer.b2", "disc.b1", "disc.b2"):
    if not 0 <= flat[name] < 1:
      _fail(name, f"must be in [0, 1), got {flat[name]}")
  if not 0 <= config.ema_decay < 1:
    _fail("ema_decay", f"must be in [0, 1) (0 turns EMA off), got {config.ema_decay}")
  if not 0 <= config.data.eval_fraction < 1:
    _fail("data.eval_fraction", f"must be in [0, 1), got {config.data.eval_fraction}")
  if config.optimizer.warmup_steps >= config.num_train_steps and config.optimizer.warmup_steps:
    _fail("optimizer.warmup_steps", f"{config.optimizer.warmup_steps} must be below "
          f"num_train_steps = {config.num_train_steps}")
  if config.disc.enabled and config.disc.norm == "group" and config.disc.filters % 32:
    _fail("disc.filters", f"{config.disc.filters} is not divisible by the 32 GroupNorm groups")
  src = config.data.source
  if src == "folder" and not config.data.path:
    _fail("data.path", "empty; data.source=folder needs a directory, glob or manifest file")
  if src == "tfds" and not config.data.tfds_name:
    _fail("data.tfds_name", "empty; data.source=tfds needs a dataset name")
  if config.loss.perceptual_weight > 0 and config.image_size < 16:
    _fail("image_size", f"{config.image_size} is below 16, the smallest input LPIPS-VGG's four "
          "2x2 max pools leave a pixel of (loss.perceptual_weight > 0)")
  if training:
    _check_training(config)
  check_batch(config.global_batch_size, num_devices, num_processes,
              grad_accum_steps=config.optimizer.grad_accum_steps)


def _check_training(config: ml_collections.ConfigDict) -> None:
  """The rules only a training run needs: the files its loss and its start read."""
  if config.loss.perceptual_weight > 0 and not config.loss.lpips_weights:
    _fail("loss.lpips_weights", f"empty, but loss.perceptual_weight="
          f"{config.loss.perceptual_weight} needs LPIPS-VGG weights: make them once with `python "
          "-m vae_scale.convert lpips --out=lpips_vgg.safetensors`, then pass "
          "--config.loss.lpips_weights=lpips_vgg.safetensors")
  if config.freeze_encoder and not config.init_from:
    _fail("init_from", "empty, but freeze_encoder=True trains the decoder against a frozen "
          "encoder, which would stay at its random init: point init_from at the weights to "
          "fine-tune (a diffusers folder, an SD VAE .safetensors, a `vae_scale.convert import` "
          "dir, or a run's workdir; resuming a run, its own workdir)")
