r"""The same training step in PyTorch (diffusers `AutoencoderKL`), timed next to vae_scale's.

  python bench/torch_reference.py --config=configs/demo.py --batch=8 --steps=10 \
      [--config.model.dtype=bfloat16] [--modes=eager,compile] [--jax=subprocess|none] \
      [--device=auto|cpu|cuda] [--channels_last] [--json_out=PATH]

The model is diffusers' `AutoencoderKL` built from the config's architecture (through
`vae_scale.interop.diffusers_config.diffusers_config_from_autoencoder`, so the parameter names and shapes are the ones
vae_scale imports and exports). One step, as vae_scale's autoencoder-only train step:
posterior sample -> decode -> L1 + ssim_weight * (1 - SSIM) + kl_weight * mean KL per latent element
(SSIM: 11x11 Gaussian window, sigma 1.5, VALID, as dm_pix), backward, global-norm clipping when the
config clips, Adam (the config's lr, b1, b2, eps 1e-8), EMA when the config keeps one, and the same
train metrics (PSNR, SSIM of clipped reconstructions, gradient norm, latent std). bfloat16 runs
under `torch.autocast` with float32 parameters, optimizer state and losses. Modes: `eager`, and
`compile` (`torch.compile` of the forward and loss; AOTAutograd compiles the backward; the optimizer
step stays eager).

With --jax=subprocess (the default) it first runs `python -m vae_scale.bench step` on one device with
the same config, batch, steps and precision, in a child process (so the two frameworks never hold
device memory at once), then prints images/s of each and the ratio vae_scale / PyTorch.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,wrong-import-position


# --------------------------------------------------------------------------- losses


def gaussian_filter(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
  """dm_pix's normalized 1-D Gaussian window."""
  hw = size // 2
  shift = (2 * hw - size + 1) / 2
  x = (torch.arange(size, dtype=torch.float32) - hw + shift) / sigma
  f = torch.exp(-0.5 * x * x)
  return f / f.sum()


def _blur(z: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
  """Separable VALID Gaussian blur of NCHW `z`, per channel."""
  c = z.shape[1]
  k = filt.to(z.device, z.dtype)
  z = F.conv2d(z, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
  return F.conv2d(z, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0, filter_size: int = 11,
         filter_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
  """SSIM per image of NCHW float images, as `dm_pix.ssim` computes it: [B]."""
  filt = gaussian_filter(filter_size, filter_sigma)
  mu0, mu1 = _blur(a, filt), _blur(b, filt)
  mu00, mu11, mu01 = mu0 * mu0, mu1 * mu1, mu0 * mu1
  eps = torch.finfo(torch.float32).eps ** 2
  s00 = torch.clamp(_blur(a * a, filt) - mu00, min=eps)
  s11 = torch.clamp(_blur(b * b, filt) - mu11, min=eps)
  s01 = _blur(a * b, filt) - mu01
  s01 = torch.sign(s01) * torch.minimum(torch.sqrt(s00 * s11), s01.abs())
  c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
  ssim_map = ((2 * mu01 + c1) * (2 * s01 + c2)) / ((mu00 + mu11 + c1) * (s00 + s11 + c2))
  return ssim_map.mean(dim=(1, 2, 3))


def autoencoder_loss(x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor,
                     logvar: torch.Tensor, *, l1_weight: float, ssim_weight: float,
                     kl_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
  """vae_scale.training.losses.autoencoder_loss in torch: float32 NCHW images in [-1, 1], posterior moments.

  loss = l1_weight * mean|x - recon| + ssim_weight * (1 - mean SSIM) + kl_weight * mean KL per
  latent element; SSIM on images mapped to [0, 1] without clipping the reconstruction.
  """
  l1 = (x - recon).abs().mean()
  s = (1.0 - ssim((x + 1) * 0.5, (recon + 1) * 0.5).mean()) if ssim_weight else x.new_zeros(())
  kl_elem = (0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)).mean()
  loss = l1_weight * l1 + ssim_weight * s + kl_weight * kl_elem
  return loss, {"l1": l1, "ssim_loss": s, "kl_per_element": kl_elem}


def train_metrics(x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor) -> dict[str, Any]:
  """PSNR and SSIM of the clipped reconstruction, latent std (as vae_scale's step reports)."""
  a = ((x + 1) * 0.5).clamp(0, 1)
  b = ((recon + 1) * 0.5).clamp(0, 1)
  mse = (a - b).square().mean(dim=(1, 2, 3))
  return {"psnr": (-10.0 * torch.log10(mse)).mean(), "ssim": ssim(a, b).mean(),
          "latent_std": mean.std()}


# --------------------------------------------------------------------------- model and step


def build_model(config, device: torch.device, seed: int = 0):
  """diffusers AutoencoderKL with the architecture of `config.model` at config.image_size."""
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  from vae_scale.interop import diffusers_config  # pylint: disable=g-import-not-at-top
  from vae_scale.models import AutoencoderConfig  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  cfg = diffusers_config.diffusers_config_from_autoencoder(AutoencoderConfig.from_config(config))
  cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
  return AutoencoderKL(**cfg).to(device)


class TrainStep:
  """One optimizer step of the autoencoder in torch, eager or under torch.compile."""

  def __init__(self, config, device: torch.device, *, compile_model: bool,
               channels_last: bool = False):
    self.device = device
    self.dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else None
    self.model = build_model(config, device, config.seed)
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    opt = config.optimizer
    self.optimizer = torch.optim.Adam(self.params, lr=opt.learning_rate, betas=(opt.b1, opt.b2),
                                      eps=1e-8, fused=device.type == "cuda")
    self.clip = opt.grad_clip_norm
    self.ema_decay = config.ema_decay
    self.ema = [p.detach().clone() for p in self.params] if self.ema_decay > 0 else None
    self.weights = {"l1_weight": config.loss.l1_weight, "ssim_weight": config.loss.ssim_weight,
                    "kl_weight": config.loss.kl_weight}
    self.forward = torch.compile(self._forward) if compile_model else self._forward

  def _forward(self, x: torch.Tensor, noise: torch.Tensor):
    with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                        enabled=self.dtype is not None):
      post = self.model.encode(x).latent_dist
      mean, logvar = post.mean.float(), post.logvar.float()
      z = mean + torch.exp(0.5 * logvar) * noise  # Reparameterized posterior sample.
      recon = self.model.decode(z).sample.float()
    loss, terms = autoencoder_loss(x, recon, mean, logvar, **self.weights)
    return loss, terms, recon.detach(), mean.detach()

  def __call__(self, x: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    loss, terms, recon, mean = self.forward(x, noise)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip or math.inf)
    self.optimizer.step()
    if self.ema is not None:
      with torch.no_grad():
        torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)  # pylint: disable=protected-access
    with torch.no_grad():
      metrics = train_metrics(x, recon, mean)
    return {"loss": loss.detach(), "grad_norm": grad_norm, **terms, **metrics}


def _sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def time_mode(config, mode: str, *, batch: int, num_steps: int, warmup: int,
              device: torch.device, channels_last: bool = False) -> dict[str, Any]:
  """Builds the step of `mode` ('eager' | 'compile'), runs warm-up and timed steps on one batch."""
  size, z, f = config.image_size, config.model.z_channels, 2 ** (len(config.model.ch_mult) - 1)
  gen = torch.Generator().manual_seed(config.seed + 1)
  x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
  noise = torch.randn(batch, z, size // f, size // f, generator=gen).to(device)
  if channels_last:
    x = x.contiguous(memory_format=torch.channels_last)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
  step = TrainStep(config, device, compile_model=mode == "compile", channels_last=channels_last)
  start = time.perf_counter()
  out = step(x, noise)
  _sync(device)
  first = time.perf_counter() - start
  for _ in range(max(0, warmup - 1)):
    out = step(x, noise)
  _sync(device)
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    out = step(x, noise)
    _sync(device)
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  loss = float(out["loss"])
  return {"mode": mode, "batch": batch, "first_step_s": first, "step_time_median_s": median,
          "step_time_min_s": min(times), "images_per_s": batch / median, "final_loss": loss,
          "finite": math.isfinite(loss),
          "peak_bytes": (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                         else None)}


# --------------------------------------------------------------------------- vae_scale side


def run_vae_scale(config_args: Sequence[str], *, batch: int, num_steps: int, warmup: int,
                  device: str) -> dict[str, Any]:
  """`python -m vae_scale.bench step`'s autoencoder step on one device, in a child process; its
  JSON report."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "jax.json")
    cmd = [sys.executable, "-m", "vae_scale.bench", "step", *config_args,
           f"--batch_per_device={batch}", "--num_devices=1", "--adversarial=ae",
           f"--steps={num_steps}", f"--warmup={warmup}", f"--json_out={out}"]
    env = dict(os.environ)
    if device == "cpu":
      env["JAX_PLATFORMS"] = "cpu"
    print("running:", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode not in (0, 3):
      print(proc.stderr[-4000:], file=sys.stderr)
      raise RuntimeError(f"vae_scale.bench step exited with {proc.returncode}")
    with open(out) as f:
      return json.load(f)


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str]):
  """--config=PATH[:ARG] and --config.FIELD=VALUE (as vae_scale.main) plus this script's flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["torch_reference"] + list(argv)
  fv = flags.FlagValues()
  config = config_flags.DEFINE_config_file("config", None, "Run config, e.g. configs/demo.py.",
                                           flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_integer("batch", 0, "Images per step (0: the config's global_batch_size).",
                       flag_values=fv)
  flags.DEFINE_integer("steps", 10, "Timed steps per mode.", flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first one compiles).",
                       flag_values=fv)
  flags.DEFINE_list("modes", ["eager", "compile"], "PyTorch modes: eager, compile.",
                    flag_values=fv)
  flags.DEFINE_enum("jax", "subprocess", ["subprocess", "none"],
                    "Also run vae_scale's step (in a child process) and print the ratios.",
                    flag_values=fv)
  flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "Device (auto: cuda if present).",
                    flag_values=fv)
  flags.DEFINE_bool("channels_last", False, "NHWC memory format for the torch model.",
                    flag_values=fv)
  flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: torch's default).", flag_values=fv)
  flags.DEFINE_string("json_out", "", "Also write the results as JSON here.", flag_values=fv)
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__)
    print(fv.get_help())
    raise SystemExit(0)
  rest = fv(argv)
  if len(rest) > 1:
    raise flags.Error(f"unexpected arguments: {' '.join(rest[1:])}")
  if config.value is None:
    raise flags.Error("--config=PATH is required")
  config_args = [a for a in argv[1:] if a.startswith("--config=") or a.startswith("--config.")]
  return fv, config.value, config_args


def main(argv: Sequence[str]) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    fv, config, config_args = parse_args(argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  batch = fv.batch or config.global_batch_size
  device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                        if fv.device == "auto" else fv.device)
  if fv.threads:
    torch.set_num_threads(fv.threads)
  if device.type == "cuda":  # The peer at its best: cuDNN autotuning, and TF32 as XLA uses it
    torch.backends.cudnn.benchmark = True  # for float32 at JAX's default precision.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  report: dict[str, Any] = {
      "command": "python bench/torch_reference.py " + " ".join(argv),
      "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"cpu ({platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} torch threads)"),
      "versions": {"python": platform.python_version(), "torch": torch.__version__,
                   "diffusers": __import__("diffusers").__version__},
      "image_size": config.image_size, "dtype": config.model.dtype, "batch": batch,
      "torch": [], "vae_scale": None}
  if fv.jax == "subprocess":  # First, so that torch holds no device memory meanwhile.
    report["vae_scale"] = run_vae_scale(config_args, batch=batch, num_steps=fv.steps,
                                        warmup=fv.warmup, device=device.type)
  for mode in fv.modes:
    try:
      row = time_mode(config, mode, batch=batch, num_steps=fv.steps, warmup=fv.warmup,
                      device=device, channels_last=fv.channels_last)
    except Exception as e:  # pylint: disable=broad-except  # e.g. no C++ compiler for inductor.
      row = {"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    report["torch"].append(row)

  print(f"\nPyTorch {torch.__version__} on {report['device']}: {config.image_size}², "
        f"{config.model.dtype}, batch {batch}")
  jax_ips = None
  if report["vae_scale"]:
    r = report["vae_scale"]["results"][0]
    jax_ips = r["images_per_s_per_device"]
    print(f"  vae_scale       {jax_ips:9.3g} img/s  step {1e3 * r['step_time_median_s']:8.4g} ms  "
          f"compile {r['lower_s'] + r['compile_s']:.3g} s  loss {r['final_loss']:.4g}")
  for row in report["torch"]:
    if "error" in row:
      print(f"  torch {row['mode']:9s} failed: {row['error']}")
      continue
    ratio = f"  vae_scale/torch {jax_ips / row['images_per_s']:.2f}x" if jax_ips else ""
    row["ratio_vae_scale_over_torch"] = jax_ips / row["images_per_s"] if jax_ips else None
    print(f"  torch {row['mode']:9s} {row['images_per_s']:9.3g} img/s  step "
          f"{1e3 * row['step_time_median_s']:8.4g} ms  first step {row['first_step_s']:.3g} s  "
          f"loss {row['final_loss']:.4g}{ratio}")
  if fv.json_out:
    with open(fv.json_out, "w") as f:
      json.dump(report, f, indent=1)
  ok = all(row.get("finite", False) for row in report["torch"])
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
