"""The run config's one table: every field's type, choices, bounds and what a change at resume means.

`FIELDS` has a row per field of a config (configs/ldm_f8.py documents what each does). `validate`
checks a config against the rows and the rules that span several fields, once, up front, so a
mistake is one clear line before anything compiles. `run.reconcile` reads the rows' `resume` to
decide what a changed field means when a run resumes from a checkpoint written under another config.

What a change at resume means (`Field.resume`):
  architecture       the autoencoder's parameter shapes or modules: refused (nothing on disk touched)
  norm_groups        same shapes, another function: refused (continuing must be asked for: init_from)
  attention          moves self-attention between levels unless the attended sizes stay the same
  disc_architecture  the discriminator's architecture: refused when it is on before and after
  disc, ema, freeze  the discriminator / EMA / encoder freezing switched: state started or dropped
  vf                 the VF loss's trained projection: started (vf_weight 0 -> > 0, or another
                     vf_feature_dim) or dropped (vf_weight -> 0)
  init               only read when a run starts
  seed               the data order: the stream restarts
  batch              images per step: the data position (in images) is kept, with a warning
  learning_rate      the schedule: a rate that jumps at the resume step is warned about
  disc_learning_rate, disc_start   likewise for the discriminator
  stream             chooses what the train stream reads for the `sources` listed: it restarts
  eval_set           chooses the held-out set (for a folder without eval_path, also the train split)
  decode             decoding and prefetching only: the data position and order are kept
  compute            computation only (dtype, remat, dropout): the parameters are unchanged
  continue           the same state continues
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from vae_scale.config import serialize
from vae_scale.errors import ConfigError
from vae_scale.config import diffusability_rules

RESUME_KINDS = ("architecture", "norm_groups", "attention", "disc_architecture", "disc", "ema",
                "freeze", "vf", "init", "seed", "batch", "learning_rate", "disc_learning_rate",
                "disc_start", "stream", "eval_set", "decode", "compute", "continue")
DATA_SOURCES = ("folder", "tfds", "synthetic", "samples")
# Held-out metrics a run can keep its best checkpoint by, and whether higher is better.
KEEP_BEST = ("eval/psnr", "eval/ssim", "eval/lpips", "eval/rfid", "eval/l1")
HIGHER_IS_BETTER = {"eval/psnr": True, "eval/ssim": True, "eval/lpips": False, "eval/rfid": False,
                    "eval/l1": False}


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field's rules.

  Attributes:
    kind: its Python type: int, float (ints accepted), str, bool or tuple (lists accepted).
    choices: the values allowed (empty: any of the type).
    min: the inclusive lower bound, or None.
    positive: must be > 0.
    below: the exclusive upper bound, or None.
    max: the inclusive upper bound, or None.
    resume: what a change at resume means (one of RESUME_KINDS; see the module docstring).
    sources: for resume='stream': the data.source values whose train stream the field chooses.
    hint: appended to a bound's error line.
  """

  kind: type
  choices: tuple[Any, ...] = ()
  min: float | None = None
  positive: bool = False
  below: float | None = None
  max: float | None = None
  resume: str = "continue"
  sources: tuple[str, ...] = ()
  hint: str = ""


def _int(**kw) -> Field:
  return Field(int, **kw)


def _float(**kw) -> Field:
  return Field(float, **kw)


def _str(**kw) -> Field:
  return Field(str, **kw)


def _bool(**kw) -> Field:
  return Field(bool, **kw)


def _tuple(**kw) -> Field:
  return Field(tuple, **kw)


_POS = dict(positive=True)
_NONNEG = dict(min=0)
_UNIT = dict(min=0, below=1)  # [0, 1)
_ARCH = dict(resume="architecture")

FIELDS: dict[str, Field] = {
    "seed": _int(resume="seed"),
    "image_size": _int(**_POS, resume="attention"),
    # -- autoencoder
    "model.in_channels": _int(**_POS, **_ARCH),
    "model.out_channels": _int(**_POS, **_ARCH),
    "model.ch": _int(**_POS, **_ARCH),
    "model.ch_mult": _tuple(**_ARCH),
    "model.num_res_blocks": _int(**_POS, **_ARCH),
    "model.attn_resolutions": _tuple(resume="attention"),
    "model.mid_attention": _bool(**_ARCH),
    "model.z_channels": _int(**_POS, **_ARCH),
    "model.double_z": _bool(**_ARCH),
    "model.norm_groups": _int(**_POS, resume="norm_groups"),
    "model.dropout": _float(min=0, below=1, resume="compute"),
    "model.dtype": _str(choices=("float32", "bfloat16"), resume="compute"),
    "model.remat": _str(choices=("none", "block", "level"), resume="compute"),
    # -- discriminator
    "disc.enabled": _bool(resume="disc"),
    "disc.start_step": _int(**_NONNEG, resume="disc_start"),
    "disc.weight": _float(**_NONNEG),
    "disc.factor": _float(**_NONNEG),
    "disc.loss": _str(choices=("hinge", "vanilla")),
    "disc.n_layers": _int(**_POS, resume="disc_architecture"),
    "disc.filters": _int(**_POS, resume="disc_architecture"),
    "disc.norm": _str(choices=("batch", "group"), resume="disc_architecture"),
    "disc.learning_rate": _float(**_POS, resume="disc_learning_rate"),
    "disc.b1": _float(**_UNIT),
    "disc.b2": _float(**_UNIT),
    # -- loss
    "loss.l1_weight": _float(**_NONNEG),
    "loss.ssim_weight": _float(**_NONNEG),
    "loss.kl_weight": _float(**_NONNEG),
    "loss.kl_warmup_steps": _int(**_NONNEG),
    "loss.l2_weight": _float(**_NONNEG),
    "loss.perceptual_weight": _float(**_NONNEG),
    "loss.lpips_weights": _str(),
    "loss.reduction": _str(choices=("mean", "ldm_sum")),
    # -- diffusability: VA-VAE's VF alignment with DINOv2, EQ-VAE's equivariance
    "loss.vf_weight": _float(**_NONNEG, resume="vf", hint=" (0 turns the VF loss off)"),
    "loss.vf_margin_cos": _float(min=0, below=2),
    "loss.vf_margin_distmat": _float(min=0, below=2),
    "loss.vf_weights": _str(),
    "loss.vf_feature_dim": _int(**_POS, resume="vf"),
    "loss.vf_adaptive": _bool(),
    "loss.vf_normalize": _str(choices=("none", "imagenet")),
    "loss.vf_pos_antialias": _bool(),
    "loss.equivariance_weight": _float(**_NONNEG, hint=" (0 turns EQ-VAE's term off)"),
    "loss.equivariance_prob": _float(min=0, max=1),
    "loss.equivariance_low_res_prob": _float(min=0, max=1),
    "loss.equivariance_scales": _tuple(),
    "loss.equivariance_rotations": _tuple(),
    # -- optimizer
    "optimizer.name": _str(choices=("adam", "adamw")),
    "optimizer.learning_rate": _float(**_POS, resume="learning_rate"),
    "optimizer.b1": _float(**_UNIT),
    "optimizer.b2": _float(**_UNIT),
    "optimizer.weight_decay": _float(**_NONNEG),
    "optimizer.schedule": _str(choices=("constant", "cosine"), resume="learning_rate"),
    "optimizer.warmup_steps": _int(**_NONNEG, resume="learning_rate"),
    "optimizer.grad_clip_norm": _float(**_NONNEG),
    "optimizer.max_consecutive_nonfinite": _int(**_NONNEG),
    "optimizer.grad_accum_steps": _int(**_POS),
    "ema_decay": _float(**_UNIT, resume="ema", hint=" (0 turns EMA off)"),
    "init_from": _str(resume="init"),
    "freeze_encoder": _bool(resume="freeze"),
    # -- data
    "data.source": _str(choices=DATA_SOURCES, resume="stream", sources=DATA_SOURCES),
    "data.path": _str(resume="stream", sources=("folder",)),
    "data.eval_path": _str(resume="eval_set"),
    "data.eval_fraction": _float(**_UNIT, resume="eval_set"),
    "data.tfds_name": _str(resume="stream", sources=("tfds",)),
    "data.tfds_data_dir": _str(resume="stream", sources=("tfds",)),
    "data.train_split": _str(resume="stream", sources=("tfds",)),
    "data.eval_split": _str(resume="eval_set"),
    "data.image_key": _str(resume="stream", sources=("tfds",)),
    "data.synthetic_size": _int(**_POS, resume="stream", sources=("synthetic", "samples")),
    "data.num_workers": _int(**_NONNEG, resume="decode"),
    "data.prefetch_batches": _int(**_NONNEG, resume="decode"),
    "data.max_pixels": _int(**_POS, resume="decode"),
    "data.reduced_jpeg_decode": _bool(resume="decode"),
    # -- the guard against divergence (run.guard) and the checkpoints kept
    "guard.enabled": _bool(),
    "guard.spike_factor": _float(min=1),
    "guard.window": _int(**_POS),
    "guard.warmup_steps": _int(**_NONNEG),
    "guard.collapse_windows": _int(**_NONNEG),
    "guard.collapse_tolerance": _float(**_NONNEG),
    "guard.max_rollbacks": _int(**_NONNEG),
    "guard.skip_extra": _int(**_NONNEG),
    "guard.lr_factor": _float(**_POS),
    "guard.lr_steps": _int(**_NONNEG),
    "checkpoint.keep_best": _str(choices=("",) + KEEP_BEST),
    # -- run
    "global_batch_size": _int(**_POS, resume="batch"),
    "num_train_steps": _int(**_POS, resume="learning_rate"),
    "log_every_steps": _int(**_POS),
    "eval_every_steps": _int(**_POS),
    "num_eval_images": _int(**_POS, resume="eval_set"),
    "inception_weights": _str(),
    "image_every_steps": _int(**_POS),
    "checkpoint_every_steps": _int(**_POS),
    "max_checkpoints_to_keep": _int(**_POS),
    "profile_steps": _int(**_NONNEG),
}


def fields_with(resume: str) -> tuple[str, ...]:
  """The fields whose change at resume means `resume` (one of RESUME_KINDS), in table order."""
  return tuple(name for name, row in FIELDS.items() if row.resume == resume)


def _fail(field: str, rule: str) -> None:
  raise ConfigError(f"config.{field}: {rule}")


def _check_row(name: str, row: Field, value: Any) -> None:
  """One field against its row: type, then choices, then bounds."""
  if row.kind is bool:
    ok = isinstance(value, bool)
  elif row.kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif row.kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  else:
    ok = isinstance(value, (row.kind, list) if row.kind is tuple else row.kind)
  if not ok:
    _fail(name, f"must be of type {row.kind.__name__}, got {value!r}")
  if row.choices and value not in row.choices:
    _fail(name, f"{value!r} is not one of {', '.join(row.choices)}")
  if row.positive and value <= 0:
    _fail(name, f"must be > 0, got {value}")
  if row.min is not None and row.below is not None and not row.min <= value < row.below:
    _fail(name, f"must be in [{row.min:g}, {row.below:g}){row.hint}, got {value}")
  if row.min is not None and value < row.min:
    _fail(name, f"must be >= {row.min:g}{row.hint}, got {value}")
  if row.max is not None and value > row.max:
    _fail(name, f"must be <= {row.max:g}{row.hint}, got {value}")


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
      DINOv2 weights for loss.vf_weight > 0, init_from for freeze_encoder); evaluate and encode
      pass False.

  Raises:
    ConfigError: on the first broken rule, naming the field and the rule.
  """
  flat = serialize.flatten(config)
  for name in sorted(flat):
    if name not in FIELDS:
      _fail(name, "unknown field (misspelt? every field is listed in configs/ldm_f8.py)")
  for name in FIELDS:
    if name not in flat:
      _fail(name, "missing (start from configs/ldm_f8.py and override fields)")
  for name, row in FIELDS.items():
    _check_row(name, row, flat[name])

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
  if config.checkpoint.keep_best in ("eval/lpips", "eval/rfid"):
    needs = "loss.lpips_weights" if config.checkpoint.keep_best == "eval/lpips" else (
        "inception_weights")
    if not (config.loss.lpips_weights if needs == "loss.lpips_weights" else
            config.inception_weights):
      _fail("checkpoint.keep_best", f"{config.checkpoint.keep_best} is measured only with "
            f"{needs} set; set it, or keep the best by eval/psnr")
  diffusability_rules.check(config)
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
  dim = config.loss.vf_feature_dim
  if config.loss.vf_weight > 0 and not config.loss.vf_weights:
    _fail("loss.vf_weights", f"empty, but loss.vf_weight={config.loss.vf_weight} needs DINOv2 "
          "weights: convert a transformers DINOv2 folder once "
          f"({diffusability_rules.dinov2_model(dim)} for loss.vf_feature_dim={dim}) with `python "
          "-m vae_scale.convert dinov2 --src=DIR --out=dinov2.safetensors`, then pass "
          "--config.loss.vf_weights=dinov2.safetensors")
  if config.freeze_encoder and not config.init_from:
    _fail("init_from", "empty, but freeze_encoder=True trains the decoder against a frozen "
          "encoder, which would stay at its random init: point init_from at the weights to "
          "fine-tune (a diffusers folder, an SD VAE .safetensors, a `vae_scale.convert import` "
          "dir, or a run's workdir; resuming a run, its own workdir)")
