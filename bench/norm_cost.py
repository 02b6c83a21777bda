r"""What the GroupNorm variance costs: the real train step built with each form, timed side by side.

  python bench/norm_cost.py --config=configs/demo.py --batch=8 [--steps=1] [--rounds=20] \
      [--forms=fast,two_pass,shifted] [--config.image_size=128] [--json_out=PATH]

Forms of the autoencoder's GroupNorm (`vae_scale.models.autoencoder.GroupNorm.__call__`):
  fast      flax's default, use_fast_variance=True: E[x²] − E[x]² (the code before issue 23; it
            loses every digit when a group's mean dwarfs its spread)
  two_pass  flax's use_fast_variance=False: E[(x − E[x])²], as XLA fuses it (what the package
            runs since issue 23)
  shifted   one pass over d = x − s, s a stop-gradient mean of a strided subsample:
            E[d²] − E[d]² (as accurate; a candidate where XLA fuses the two sums into one pass)
Each form's autoencoder-only step is built as the train loop builds it (`bench_step.compile_step`,
one device) while that form is swapped in (the swap lasts only for tracing; the compiled program
keeps it). All forms start from the same state and batch and run one untimed step. Then each of
`--rounds` rounds runs every form for `--steps` timed steps, the order rotating from round to
round, so that load from other processes falls on all forms alike. Reported per form: the median
step time, and the median over rounds of its step time over the first form's in the same round,
with the quartiles of those ratios (their spread says how much the machine's load moved them).
The fast and shifted forms exist only here, not in the package.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position  (after the sys.path entry above)
import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from vae_scale.tools import bench_step
from vae_scale.models import autoencoder
# pylint: enable=g-import-not-at-top,wrong-import-position


def _flax_call(fast: bool) -> Callable[[Any, jax.Array], jax.Array]:
  """GroupNorm.__call__ through flax's nnx.GroupNorm with use_fast_variance=`fast`."""

  def call(self, x: jax.Array) -> jax.Array:
    self.norm.use_fast_variance = fast  # A static attribute, read while tracing.
    return self.norm(x.astype(jnp.float32)).astype(x.dtype)

  return call


SHIFT_STRIDE = 8  # The shift of `_shifted_call` averages every 8th row and column of a group.


def _shifted_call(self, x: jax.Array) -> jax.Array:
  """GroupNorm.__call__ as one pass over shifted values: d = x − s with s a stop-gradient mean of a
  strided subsample (a fraction f >= 1/64 of the group, so (s − mean)² <= Var / f and E[d²] − E[d]²
  loses at most 6 of float32's bits), output (d − E[d]) / σ (never forms the large mean)."""
  norm, c = self.norm, x.shape[-1]
  xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (norm.num_groups, c // norm.num_groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  sub = xg[(slice(None),) + (slice(None, None, SHIFT_STRIDE),) * (x.ndim - 2)]
  d = xg - jax.lax.stop_gradient(jnp.mean(sub, axes, keepdims=True))
  mean_d = jnp.mean(d, axes, keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(d), axes, keepdims=True) - jnp.square(mean_d), 0.0)
  y = ((d - mean_d) * jax.lax.rsqrt(var + norm.epsilon)).reshape(x.shape)
  return (y * norm.scale[...] + norm.bias[...]).astype(x.dtype)


FORMS: dict[str, Callable[[Any, jax.Array], jax.Array]] = {
    "fast": _flax_call(True),
    "two_pass": _flax_call(False),  # What the package runs.
    "shifted": _shifted_call,
}


def compile_forms(config, forms: Sequence[str], batch: int) -> dict[str, bench_step.StepProgram]:
  """The ae step of `config` at `batch` images on one device, compiled once per form."""
  programs = {}
  for form in forms:
    with mock.patch.object(autoencoder.GroupNorm, "__call__", FORMS[form]):
      programs[form] = bench_step.compile_step(config, "ae", batch, jax.devices()[:1])
    print(f"{form}: compiled in {programs[form].compile_s:.1f} s", flush=True)
  return programs


def time_forms(programs: dict[str, bench_step.StepProgram], config, steps: int, rounds: int
               ) -> dict[str, list[list[float]]]:
  """Seconds per step of each form, per round: {form: [[s, ...] per round]}."""
  forms = list(programs)
  states = {f: programs[f].init() for f in forms}
  batch = bench_step.synthetic_batch(programs[forms[0]], config.image_size, config.seed + 1)
  for form in forms:  # One untimed step each (first-run allocations).
    states[form], metrics = programs[form].compiled(states[form], batch)
    jax.block_until_ready((states[form], metrics))
  times: dict[str, list[list[float]]] = {f: [] for f in forms}
  for r in range(rounds):
    for form in forms[r % len(forms):] + forms[:r % len(forms)]:
      compiled, state = programs[form].compiled, states[form]
      round_times = []
      for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        round_times.append(time.perf_counter() - start)
      states[form] = state
      times[form].append(round_times)
    print(f"round {r}: " + ", ".join(f"{f} {statistics.median(times[f][-1]):.3f} s" for f in forms),
          flush=True)
  return times


def summarize(times: dict[str, list[list[float]]]) -> dict[str, Any]:
  """Per form: the median step time, and the ratio to the first form's step time in the same round
  (median over rounds, with its quartiles: the pairing cancels most of the machine's load drift)."""
  forms = list(times)
  base = forms[0]
  rows = {}
  for f in forms:
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(times[f], times[base])]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    rows[f] = {"median_s": statistics.median([t for rnd in times[f] for t in rnd]),
               "ratio": statistics.median(ratios), "ratio_quartiles": [quartiles[0], quartiles[2]],
               "round_ratios": ratios, "times_s": times[f]}
  return {"baseline": base, "forms": rows}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main(argv: Sequence[str]) -> int:
  fv = flags.FlagValues()
  argv = ["norm_cost"] + list(argv)
  config = config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py).",
                                           flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_integer("batch", 8, "Images per step (one device).", flag_values=fv)
  flags.DEFINE_integer("steps", 1, "Timed steps per form and round.", flag_values=fv)
  flags.DEFINE_integer("rounds", 20, "Rounds; each runs every form.", flag_values=fv)
  flags.DEFINE_list("forms", list(FORMS), f"Forms to compare, the first is the baseline "
                    f"({', '.join(FORMS)}).", flag_values=fv)
  flags.DEFINE_string("json_out", "", "Also write the report as JSON here.", flag_values=fv)
  fv(argv)
  unknown = [f for f in fv.forms if f not in FORMS]
  if config.value is None or unknown:
    print(f"error: --config is required; forms are {', '.join(FORMS)} (got {unknown})",
          file=sys.stderr)
    return 2
  cfg = config.value
  devices = jax.devices()
  programs = compile_forms(cfg, fv.forms, fv.batch)
  report = summarize(time_forms(programs, cfg, fv.steps, fv.rounds))
  report.update(
      command="python bench/norm_cost.py " + " ".join(argv[1:]), image_size=cfg.image_size,
      batch=fv.batch, dtype=cfg.model.dtype, device=devices[0].device_kind, cpu=_cpu_model(),
      compile_s={f: p.compile_s for f, p in programs.items()})
  for form, row in report["forms"].items():
    low, high = row["ratio_quartiles"]
    print(f"{form:>9}: median {row['median_s']:.4f} s/step; {row['ratio']:.3f}x "
          f"{report['baseline']} in the same round (quartiles {low:.3f}-{high:.3f}, "
          f"{len(row['round_ratios'])} rounds)")
  if fv.json_out:
    with open(fv.json_out, "w") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
