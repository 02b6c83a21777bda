r"""Encodes a dataset into latents for training a diffusion model in the autoencoder's latent space.

  python -m vae_scale.encode --config=configs/ldm_f8.py --workdir=RUN --output_dir=LATENTS \
      [--split=train] [--mode=mean|sample] [--dtype=float16] [--step=N|best] [--params=PATH]

Every image of the split is read once in a fixed order (center crops, as evaluation sees them).
Each process of a multi-host run encodes its share `[process_index::process_count]` on its own
devices and writes its own shards `latents-{process:05d}-{shard:05d}.npz` (keys `latents`
[N, h, w, c] and `index`, the image's position in the split). Process 0 writes `metadata.json`:
latent shape, count, mode, and the latent statistics over all processes, including
`scale_factor` = 1 / std (LDM's 0.18215 for SD) and `shift_factor` = mean. A diffusion model trains
on `(latents - shift_factor) * scale_factor`; SD-style pipelines that ignore the shift use
`latents * scale_factor`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from vae_scale import cli
from vae_scale.config import schema
from vae_scale import models
from vae_scale.training import sharding
from vae_scale.data import pipeline
from vae_scale.data import sources
from vae_scale.training.metrics import Moments
from vae_scale.training.metrics import latent_summary
from vae_scale.run import weights as weights_lib
from vae_scale.models import AutoencoderConfig

METADATA = "metadata.json"


def shard_name(process_index: int, shard: int) -> str:
  return f"latents-{process_index:05d}-{shard:05d}.npz"


# --------------------------------------------------------------------------- encoding


def _encode_batch(params: Any, x: jax.Array, rng: jax.Array, *, graphdef: nnx.GraphDef,
                  mode: str) -> jax.Array:
  """Latents [B, h, w, c] of images [B, H, W, 3] in [-1, 1]: the posterior mean or a draw."""
  model = nnx.merge(graphdef, params)
  post = model.encode(x)
  return post.sample(rng) if mode == "sample" else post.mean


@dataclasses.dataclass
class Share:
  """What one process encoded: its image count, shard files and latent moments."""

  process_index: int
  count: int
  shards: list[str]
  moments: Moments


def _write_npz(path: epath.Path, **arrays) -> None:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  path.write_bytes(buf.getvalue())


def encode_share(config: ml_collections.ConfigDict, params: Any, model_cfg: AutoencoderConfig, output_dir: str, *,
                 process_index: int, process_count: int, split: str = "train",
                 mode: str = "mean", dtype: str = "float32", images_per_shard: int = 10_000,
                 batch_size: int | None = None, source=None) -> Share:
  """Encodes share `process_index` of `process_count` of a split on this process's devices.

  Args:
    params: autoencoder params (numpy or device arrays).
    split: 'train' or 'eval' (`data.sources.make_source`).
    mode: 'mean' (the posterior mean) or 'sample' (one draw, seeded by config.seed).
    dtype: 'float32' or 'float16' for the stored latents (statistics use float32 values).
    batch_size: images per device call; default global_batch_size / process_count, rounded up to
      a multiple of the local device count.
  Returns:
    The share's count, shard file names and latent moments.
  """
  source = source if source is not None else sources.make_source(config, split)
  mesh = sharding.create_mesh(jax.local_devices())
  ndev = jax.local_device_count()
  batch_size = batch_size or max(1, config.global_batch_size // process_count)
  batch_size = -(-batch_size // ndev) * ndev
  repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  graphdef = models.autoencoder_graphdef(model_cfg)
  encode = jax.jit(functools.partial(_encode_batch, graphdef=graphdef, mode=mode),
                   in_shardings=(repl, batch_sh, repl), out_shardings=batch_sh)
  params = jax.device_put(params, repl)
  root = jax.random.fold_in(jax.random.key(config.seed), process_index)
  out = epath.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)

  moments = Moments.empty(model_cfg.z_channels)
  shards: list[str] = []
  buf_z: list[np.ndarray] = []
  buf_i: list[np.ndarray] = []
  count = 0

  def flush():
    name = shard_name(process_index, len(shards))
    _write_npz(out / name, latents=np.concatenate(buf_z).astype(dtype),
               index=np.concatenate(buf_i))
    shards.append(name)
    buf_z.clear()
    buf_i.clear()

  for b, batch in enumerate(pipeline.share_dataset(config, source, process_index, process_count,
                                          batch_size)):
    x, idx = batch["image"], np.asarray(batch["index"], np.int64)
    n = len(idx)
    if n < batch_size:  # Pad the last batch to the compiled shape; the padding is dropped.
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
    z = np.asarray(jax.device_get(encode(params, x, jax.random.fold_in(root, b))))[:n]
    moments = moments.merge(Moments.of(z))
    count += n
    while n:
      room = images_per_shard - sum(len(a) for a in buf_i)
      buf_z.append(z[:room])
      buf_i.append(idx[:room])
      z, idx, n = z[room:], idx[room:], max(0, n - room)
      if sum(len(a) for a in buf_i) >= images_per_shard:
        flush()
  if buf_i:
    flush()
  logging.info("Process %d encoded %d images into %d shards", process_index, count, len(shards))
  return Share(process_index, count, shards, moments)


def _gather_shares(share: Share, channels: int) -> list[Share]:
  """Every process's Share, on every process (a collective when there are several)."""
  pc = jax.process_count()
  if pc == 1:
    return [share]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  ints = multihost_utils.process_allgather(
      np.array([share.count, len(share.shards)], np.int32))
  # float32 is plenty for a mean and a sum of squares (relative precision 1e-7).
  floats = multihost_utils.process_allgather(
      np.concatenate([[share.moments.n], share.moments.mean, share.moments.m2]).astype(np.float32))
  out = []
  for p in range(pc):
    count, nshards = (int(v) for v in np.asarray(ints)[p])
    f = np.asarray(floats, np.float64)[p]
    out.append(Share(p, count, [shard_name(p, s) for s in range(nshards)],
                     Moments(float(f[0]), f[1:1 + channels], f[1 + channels:])))
  return out


def write_metadata(output_dir: str, shares: list[Share], **fields) -> dict[str, Any]:
  """Combines the shares' statistics and writes `metadata.json`; returns its content."""
  moments = functools.reduce(Moments.merge, [s.moments for s in shares],
                             Moments.empty(len(shares[0].moments.mean)))
  meta = {"format": "vae_scale.latents", "version": 1}
  meta.update(fields)
  meta.update(count=int(sum(s.count for s in shares)),
              shards=[name for s in sorted(shares, key=lambda s: s.process_index)
                      for name in s.shards],
              images_per_process=[s.count for s in sorted(shares, key=lambda s: s.process_index)])
  meta.update(latent_summary(moments))
  (epath.Path(output_dir) / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
  return meta


def read_latents(output_dir: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """All latents of an `encode` output, ordered by image index: (latents, index, metadata)."""
  out = epath.Path(output_dir)
  meta = json.loads((out / METADATA).read_text())
  zs, idx = [], []
  for name in meta["shards"]:
    with np.load(io.BytesIO((out / name).read_bytes())) as f:
      zs.append(f["latents"])
      idx.append(f["index"])
  z, i = np.concatenate(zs), np.concatenate(idx)
  order = np.argsort(i, kind="stable")
  return z[order], i[order], meta


def run(config: ml_collections.ConfigDict, workdir: str | None, output_dir: str, *, step: int | None = None,
        weights: str = "auto", params_path: str | None = None, split: str = "train",
        mode: str = "mean", dtype: str = "float32", images_per_shard: int = 10_000,
        batch_size: int | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Encodes split `split` of `config`'s data with a run's checkpoint (or weights at
  `params_path`) into `output_dir`. Every process calls it; returns the metadata.

  Raises:
    ConversionError: no such checkpoint, or weights that don't fit config.model.
    DataError: unusable data.
    ConfigError: bad mode or dtype, or `output_dir` already holds latents and `overwrite` is False.
  """
  if mode not in ("mean", "sample"):
    raise cli.usage_error(f"--mode={mode!r}: use 'mean' or 'sample'")
  if dtype not in ("float32", "float16"):
    raise cli.usage_error(f"--dtype={dtype!r}: use 'float32' or 'float16'")
  pi, pc = jax.process_index(), jax.process_count()
  if (epath.Path(output_dir) / METADATA).exists() and not overwrite:
    raise cli.usage_error(f"{output_dir} already holds encoded latents ({METADATA}); choose "
                          "another --output_dir or pass --overwrite")
  source = sources.make_source(config, split)  # Fails on bad data before loading weights.
  model_cfg = AutoencoderConfig.from_config(config)
  params, step, which = weights_lib.load_weights(config, workdir, params_path, step, weights)
  share = encode_share(config, params, model_cfg, output_dir, process_index=pi, process_count=pc,
                       split=split, mode=mode, dtype=dtype, images_per_shard=images_per_shard,
                       batch_size=batch_size, source=source)
  shares = _gather_shares(share, model_cfg.z_channels)
  f = 2 ** (len(model_cfg.ch_mult) - 1)
  fields = dict(
      latent_shape=[config.image_size // f, config.image_size // f, model_cfg.z_channels],
      layout="NHWC", mode=mode, dtype=dtype, split=split, image_size=config.image_size,
      source=repr(source), checkpoint=params_path or str(workdir), step=int(step),
      weights=which, process_count=pc,
      usage="diffusion inputs = (latents - shift_factor) * scale_factor; decode "
            "latents = inputs / scale_factor + shift_factor",
      config=json.loads(config.to_json_best_effort()))
  if pi == 0:
    meta = write_metadata(output_dir, shares, **fields)
  else:
    meta = None
  if pc > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("vae_scale.tools.encode.done")
  if meta is None:
    meta = json.loads((epath.Path(output_dir) / METADATA).read_text()) if (
        epath.Path(output_dir) / METADATA).exists() else fields
  logging.info("Encoded %s images: latent std %.4g, scale_factor %.6g, shift_factor %.4g",
               meta.get("count"), meta.get("latent_std", float("nan")),
               meta.get("scale_factor") or float("nan"), meta.get("shift_factor", float("nan")))
  return meta


# --------------------------------------------------------------------------- CLI


def define_flags() -> dict[str, Any]:
  """The flags of `python -m vae_scale.encode` (defined by `entry` only)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags
  return {
      **cli.define_distributed_flags(),
      **cli.define_weights_flags("encodes", "The run's config (model and data), e.g. "
                                 "configs/ldm_f8.py (--config.data.path=/data/images)."),
      "output_dir": f.DEFINE_string("output_dir", None, "Where shards and metadata.json go."),
      "split": f.DEFINE_enum("split", "train", ["train", "eval"], "Which split to encode."),
      "mode": f.DEFINE_enum("mode", "mean", ["mean", "sample"],
                            "Store the posterior mean, or one sample of the posterior."),
      "dtype": f.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored latent dtype."),
      "images_per_shard": f.DEFINE_integer("images_per_shard", 10_000, "Images per .npz shard."),
      "batch_size": f.DEFINE_integer("batch_size", None, "Images per device call per process "
                                     "(default: global_batch_size / processes)."),
      "overwrite": f.DEFINE_bool("overwrite", False, "Replace latents already in output_dir."),
  }


def main(argv: list[str], fl: dict[str, Any]) -> int:
  """Checks the flags, starts jax.distributed, encodes; prints count, shape and factors as JSON."""
  if len(argv) > 1:
    raise cli.usage_error(f"unexpected arguments {' '.join(argv[1:])}")
  v = {k: x.value for k, x in fl.items()}
  if v["output_dir"] is None or not (v["workdir"] or v["params"]):
    raise cli.usage_error("--output_dir and --workdir (or --params with --config) are required")
  v["config"] = cli.run_config(fl)
  schema.validate(v["config"], training=False)
  cli.init_distributed(fl)
  meta = run(v["config"], v["workdir"], v["output_dir"], step=v["step"], weights=v["weights"],
             params_path=v["params"], split=v["split"], mode=v["mode"], dtype=v["dtype"],
             images_per_shard=v["images_per_shard"], batch_size=v["batch_size"],
             overwrite=v["overwrite"])
  if jax.process_index() == 0:
    print(json.dumps({k: meta[k] for k in ("count", "latent_shape", "scale_factor",
                                           "shift_factor")}))
  return 0


def entry() -> None:
  """`python -m vae_scale.encode`: defines the flags, runs `main` through `cli.run` (exits)."""
  fl = cli.main_module_flags(define_flags)
  cli.run(lambda argv: main(argv, fl))
