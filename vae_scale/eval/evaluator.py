"""The one evaluation of an autoencoder on held-out images, used by the train loop and `evaluate`.

Over the eval set (`data.pipeline.eval_batches`: every process the same number of batches, a short
share padded with weight-0 images): PSNR and SSIM (mean and std over images), mean L1, KL per latent
channel, the latent mean/std (overall and per channel; 1/std is the scale factor a diffusion
model would use), the share of the latent's spectral energy above half its Nyquist frequency
(`spectral_energy`: EQ-VAE's measure, regularised latents carry less of it), and image grids of the
first batch. Given LPIPS params: LPIPS (mean and std); given Inception params: rFID between the
held-out images and their reconstructions (`fid`); given DINOv2 params and a run's VF projection:
the mean cosine between projected latents and DINOv2's patch features (`vf_cosine`).
Reconstructions are clipped to [-1, 1] for every metric, as a saved image would be.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from vae_scale.training import losses
from vae_scale.training import metrics
from vae_scale import models
from vae_scale.eval import fid
from vae_scale.eval import report
from vae_scale.training import sharding
from vae_scale.data import pipeline
from vae_scale.errors import ConfigError
from vae_scale.errors import DataError
from vae_scale.models import dinov2 as dinov2_lib
from vae_scale.models import inception
from vae_scale.models import lpips
from vae_scale.models.dinov2 import Dinov2Config
from vae_scale.training import vf_loss

GRIDS = ("reconstructions", "prior_samples", "interpolations")
NUM_SHOWN = 8  # Images per reconstruction / prior-sample grid.
NUM_PAIRS = 4  # Interpolated pairs.
NUM_STEPS = 8  # Interpolation steps per pair (ends included).


HALF_NYQUIST = 0.25  # Cycles per latent pixel: half the Nyquist frequency (0.5).


def spectral_energy(z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per image, the spectral energy of latents above half the Nyquist frequency, and in all.

  Per image and channel the spatial mean is removed (the DC term says nothing of texture), then
  |FFT2|^2 over (h, w) is summed over the frequencies whose radius sqrt(fy^2 + fx^2) (cycles per
  latent pixel, numpy's fftfreq) exceeds HALF_NYQUIST, and over all, and over channels.

  Args:
    z: latents [B, h, w, c].
  Returns:
    (high [B], total [B]) float32; the share of a set of images is sum(high) / sum(total).
  """
  z = z.astype(jnp.float32)
  z = z - jnp.mean(z, axis=(1, 2), keepdims=True)
  spectrum = jnp.fft.fft2(z, axes=(1, 2))
  power = jnp.square(jnp.real(spectrum)) + jnp.square(jnp.imag(spectrum))
  fy = jnp.fft.fftfreq(z.shape[1])[:, None]
  fx = jnp.fft.fftfreq(z.shape[2])[None, :]
  high = (jnp.sqrt(fy ** 2 + fx ** 2) > HALF_NYQUIST).astype(jnp.float32)[None, :, :, None]
  return jnp.sum(power * high, axis=(1, 2, 3)), jnp.sum(power, axis=(1, 2, 3))


def vf_cosine(vf_proj: jax.Array, z: jax.Array, features: jax.Array) -> jax.Array:
  """Per image, the mean over positions of cos(proj(z), f), LightningDiT's cosine.

  Args:
    vf_proj: the run's projection [c, D].
    z: latents [B, h, w, c].
    features: DINOv2's patch features [B, h, w, D] of the same images on the latent grid.
  Returns:
    [B] float32 in [-1, 1].
  """
  z_proj = vf_loss.project(vf_proj, z)
  # cosine_margin_loss with margin 0 is the mean of 1 - cos (cos <= 1, so relu is idle).
  return jax.vmap(lambda a, b: 1.0 - vf_loss.cosine_margin_loss(a[None], b[None], 0.0))(
      z_proj, features)


def eval_sums(params: Any, batch: dict[str, jax.Array], nets: dict[str, Any] | None = None,
              vf_proj: jax.Array | None = None, *, graphdef: nnx.GraphDef,
              dinov2_cfg: Dinov2Config | None = None, vf_normalize: str = "none"
              ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Weighted sums of the metrics over a global batch (weight 0 marks padding), and features.

  Args:
    params: autoencoder params.
    batch: {'image': [B, H, W, 3] in [-1, 1], 'weight': [B] in {0, 1}}.
    nets: frozen feature networks' params: 'lpips' (LPIPS-VGG), 'inception' and/or 'dinov2', or
      None.
    vf_proj: the run's VF projection [c, D] (with 'dinov2': adds the cosine), or None.
    graphdef: the autoencoder's GraphDef.
    dinov2_cfg, vf_normalize: DINOv2's architecture and input normalisation (with 'dinov2').
  Returns:
    (sums, features). sums: scalars n, psnr, psnr_sq, ssim, ssim_sq, l1, hf_energy, energy (and
    lpips, lpips_sq with 'lpips'; vf_cos with 'dinov2' and vf_proj); kl [C]; the latent moments
    of this batch lat_n, lat_mean [C], lat_m2 [C].
    features (with 'inception', else {}): real, fake [B, 2048] pool3 features of the inputs and of
    the clipped reconstructions, and weight [B], all batch-sharded.
  """
  nets = nets or {}
  x, w = batch["image"], batch["weight"]
  model = nnx.merge(graphdef, params)
  post = model.encode(x)
  recon = model.decode(post.mean)
  psnr, ssim = losses.psnr(x, recon), losses.ssim_metric(x, recon)
  l1 = jnp.mean(jnp.abs(x - recon.astype(jnp.float32)), axis=(1, 2, 3))
  kl = jnp.sum(post.kl_per_element(), axis=(1, 2))  # [B, C]
  z = post.mean.astype(jnp.float32)
  n = jnp.sum(w) * z.shape[1] * z.shape[2]
  wz = w[:, None, None, None]
  mean = jnp.sum(wz * z, axis=(0, 1, 2)) / jnp.maximum(n, 1.0)
  m2 = jnp.sum(wz * jnp.square(z - mean), axis=(0, 1, 2))
  wsum = lambda v: jnp.sum(w * v)
  sums = {"n": jnp.sum(w), "psnr": wsum(psnr), "psnr_sq": wsum(psnr ** 2), "ssim": wsum(ssim),
          "ssim_sq": wsum(ssim ** 2), "l1": wsum(l1), "kl": jnp.sum(w[:, None] * kl, axis=0),
          "lat_n": n, "lat_mean": mean, "lat_m2": m2}
  high, total = spectral_energy(z)
  sums.update(hf_energy=wsum(high), energy=wsum(total))
  if "dinov2" in nets and vf_proj is not None:
    pixels = dinov2_lib.preprocess(x, z.shape[1:3], patch_size=dinov2_cfg.patch_size,
                                   normalize=vf_normalize)
    feats = dinov2_lib.dinov2_features(nets["dinov2"], dinov2_cfg, pixels).patches
    sums["vf_cos"] = wsum(vf_cosine(vf_proj, z, feats))
  clipped = jnp.clip(recon.astype(jnp.float32), -1.0, 1.0)
  if "lpips" in nets:
    d = lpips.lpips_distance(nets["lpips"], clipped, x)
    sums.update(lpips=wsum(d), lpips_sq=wsum(d ** 2))
  features = {}
  if "inception" in nets:
    features = {"real": inception.inception_features(nets["inception"], x),
                "fake": inception.inception_features(nets["inception"], clipped), "weight": w}
  return sums, features


def grids(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, graphdef: nnx.GraphDef,
          kinds: Sequence[str], num_shown: int, num_pairs: int, num_steps: int
          ) -> dict[str, jax.Array]:
  """Image grids [rows, cols, H, W, 3] in [-1, 1] of the first images of a batch.

  reconstructions: inputs above their reconstructions; prior_samples: decodes of N(0, I) latents;
  interpolations: per pair, the two inputs around decodes of interpolated latents.
  """
  x = batch["image"]
  model = nnx.merge(graphdef, params)
  post = model.encode(x[:max(num_shown, 2 * num_pairs)])
  out = {}
  if "reconstructions" in kinds:
    out["reconstructions"] = jnp.stack([x[:num_shown], model.decode(post.mean[:num_shown])])
  if "prior_samples" in kinds:
    out["prior_samples"] = model.decode(
        jax.random.normal(rng, (num_shown,) + post.mean.shape[1:]))[None]
  if "interpolations" in kinds:
    za, zb = post.mean[0:2 * num_pairs:2], post.mean[1:2 * num_pairs:2]
    t = jnp.linspace(0.0, 1.0, num_steps)[None, :, None, None, None]
    z = (1.0 - t) * za[:, None] + t * zb[:, None]  # [P, T, h, w, c]
    dec = model.decode(z.reshape((-1,) + z.shape[2:])).reshape(z.shape[:2] + x.shape[1:])
    out["interpolations"] = jnp.concatenate(
        [x[0:2 * num_pairs:2, None], dec, x[1:2 * num_pairs:2, None]], axis=1)
  return {k: v.astype(jnp.float32) for k, v in out.items()}


class Evaluator:
  """Compiled once per run; `__call__` evaluates params on the held-out set.

  Args:
    config: the run config (global_batch_size, num_eval_images, model, seed).
    mesh: the data mesh (batches are split over it, params replicated).
    kinds: which grids to draw (a subset of GRIDS).
    lpips_params: LPIPS-VGG params (`frozen_weights.load_lpips_params`): adds `lpips`, or None.
    inception_params: pytorch-fid Inception params (`frozen_weights.load_inception_params`): adds
      `rfid`, or None.
    dinov2: DINOv2 (params, architecture) (`frozen_weights.load_dinov2_params`): adds `vf_cosine`
      for a run with a VF projection, or None. Its input is the run's (loss.vf_normalize,
      loss.vf_pos_antialias).
    log_every_batches: log progress (done/total, images/s, ETA) every this many batches; 0: never.
  Raises:
    ConfigError: LPIPS asked for images smaller than 16 px.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh,
               kinds: Sequence[str] = GRIDS, *, lpips_params: Any = None,
               inception_params: Any = None, dinov2: tuple[Any, Dinov2Config] | None = None,
               log_every_batches: int = 0):
    self._config, self._mesh, self._log_every = config, mesh, log_every_batches
    self._model_cfg = models.AutoencoderConfig.from_config(config)
    graphdef = models.autoencoder_graphdef(self._model_cfg)
    repl, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    in_sh = (repl, {"image": batch_sh, "weight": batch_sh})
    if lpips_params is not None and config.image_size < 16:
      raise ConfigError(f"config.image_size: {config.image_size} is below 16, the smallest input "
                        "LPIPS-VGG leaves a pixel of; evaluate without --lpips_weights")
    self._dinov2_cfg = None
    if dinov2 is not None:
      self._dinov2_cfg = dataclasses.replace(
          dinov2[1], pos_antialias=bool(config.loss.vf_pos_antialias))
    nets = {"lpips": lpips_params, "inception": inception_params,
            "dinov2": dinov2[0] if dinov2 is not None else None}
    self._nets = {k: jax.device_put(v, repl) for k, v in nets.items() if v is not None}
    self._sums = jax.jit(functools.partial(eval_sums, graphdef=graphdef,
                                           dinov2_cfg=self._dinov2_cfg,
                                           vf_normalize=config.loss.vf_normalize),
                         in_shardings=in_sh + (repl, repl), out_shardings=(repl, batch_sh))
    b = config.global_batch_size
    self._grids = jax.jit(functools.partial(
        grids, graphdef=graphdef, kinds=tuple(kinds), num_shown=min(NUM_SHOWN, b),
        num_pairs=max(1, min(NUM_PAIRS, b // 2)), num_steps=NUM_STEPS),
        in_shardings=in_sh + (repl,), out_shardings=repl)

  def __call__(self, params: Any, dataset: Any, process_count: int, vf_proj: Any = None
               ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluates `params` (replicated on the mesh) on this process's share `dataset`.

    Args:
      params: autoencoder params.
      dataset: `data.pipeline.create_eval_dataset(...)` of this process.
      process_count: processes in the run.
      vf_proj: the run's VF projection [z_channels, D] (TrainState.vf_proj), or None.
    Returns:
      (metrics: psnr, psnr_std, ssim, ssim_std, l1, kl, kl_per_channel, num_images, lpips and
      lpips_std (None without LPIPS params), rfid (None without Inception params),
      latent_hf_share (`spectral_energy`: sum of high / sum of total over the images), vf_cosine
      (None without DINOv2 params or a projection) and the `metrics.latent_summary` fields;
      grids: name -> uint8 [rows*H, cols*W, 3]).
    Raises:
      DataError: not one held-out image could be read.
      ConfigError: a projection whose width is not the DINOv2's.
    """
    if vf_proj is not None and self._dinov2_cfg is None:
      vf_proj = None  # No DINOv2 to compare with: no cosine.
    if vf_proj is not None and vf_proj.shape[-1] != self._dinov2_cfg.hidden_size:
      raise ConfigError(f"the run's VF projection maps to width {vf_proj.shape[-1]}, but the "
                        f"DINOv2 weights given have width {self._dinov2_cfg.hidden_size}: give "
                        "the DINOv2 the run trained with (config.loss.vf_weights)")
    totals, moments, shown = None, metrics.Moments.empty(self._model_cfg.z_channels), None
    num_batches = pipeline.num_eval_batches(self._config, process_count)
    progress = report.Progress(num_batches, self._log_every)
    features = fid.RFID() if "inception" in self._nets else None
    batches: Iterable = pipeline.eval_batches(self._config, dataset, process_count)
    for i, local in enumerate(batches, 1):
      batch = sharding.global_batch(local, self._mesh)
      if shown is None:
        shown = self._grids(params, batch, jax.random.key(self._config.seed))
      sums, feats = self._sums(params, batch, self._nets, vf_proj)
      if features is not None:  # This process's rows only; all processes merge at the end.
        features.add(*(fid.local_rows(feats[k]) for k in ("real", "fake", "weight")))
      s = jax.tree.map(lambda v: np.asarray(v, np.float64), jax.device_get(sums))
      moments = moments.merge(metrics.Moments(float(s["lat_n"]), s["lat_mean"], s["lat_m2"]))
      s = {k: v for k, v in s.items() if not k.startswith("lat_")}
      totals = s if totals is None else jax.tree.map(np.add, totals, s)
      progress.update(i, float(s["n"]))
    if totals["n"] == 0:
      raise DataError("the evaluation set yielded no readable images; check config.data")
    n = totals["n"]
    mean_std = lambda k: (float(totals[k] / n),
                          float(np.sqrt(max(totals[k + "_sq"] / n - (totals[k] / n) ** 2, 0.0))))
    psnr, psnr_std = mean_std("psnr")
    ssim, ssim_std = mean_std("ssim")
    kl_c = totals["kl"] / n
    result: dict[str, Any] = {
        "num_images": int(n), "psnr": psnr, "psnr_std": psnr_std, "ssim": ssim,
        "ssim_std": ssim_std, "l1": float(totals["l1"] / n), "kl": float(np.sum(kl_c)),
        "kl_per_channel": [float(v) for v in kl_c], "lpips": None, "lpips_std": None,
        "rfid": None, "latent_hf_share": float(totals["hf_energy"] / max(totals["energy"], 1e-30)),
        "vf_cosine": float(totals["vf_cos"] / n) if "vf_cos" in totals else None}
    if "lpips" in totals:
      result["lpips"], result["lpips_std"] = mean_std("lpips")
    if features is not None:
      result["rfid"] = features.compute(process_count)[0]
    result.update(metrics.latent_summary(moments))
    return result, {k: report.tile(v) for k, v in jax.device_get(shown).items()}
