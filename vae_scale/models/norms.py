"""How the package's norms compute their statistics: two-pass, in float32 or wider.

Flax's norms default to `use_fast_variance=True`: Var = E[x²] − E[x]², which cancels when a group's
mean is large against its spread (at mean 20 and spread 0.01 the float32 output is off by 28.5 of
its own unit; flat images give early layers such groups). Every norm of the package is built with
`use_fast_variance=False`: the mean first, then the mean of squared deviations E[(x − E[x])²], as
PyTorch's norms compute it (tests/norms_test.py fails on any other).

Why two-pass and not a cheaper form (issue 23; BENCHMARKS.md, "Norm variance"): a one-pass
variance of shifted values (d = x − s, s a stop-gradient subsample mean, Var = E[d²] − E[d]²) is
as accurate (more so at mean 20: 1.2e-6 against two-pass's 5.5e-4, whose float32 mean carries the
rounding) but cost the demo's CPU step 7% more than two-pass (its shift is two more small
kernels); and XLA:CPU does not fuse the fast form's two sums into one pass either, so two-pass
cost what the fast form cost, within noise (demo +3-6%, ldm_f8 +1-2%). `bench/norm_cost.py`
measures all three on an accelerator, where XLA can fuse sibling sums (bench/gpu_suite.sh part
`norm`).

Statistics are computed in `stat_dtype(x.dtype)`: float32 for bfloat16 and float32 activations,
float64 in a float64 run (the float64 yardstick, tests/numerics_test.py).
"""

from __future__ import annotations

import jax.numpy as jnp


def stat_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """The dtype of statistics, losses and other float32 islands: float32, or float64 for float64.

  Args:
    dtype: the dtype of the values (bfloat16, float32 or float64).
  Returns:
    float32 for bfloat16 and float32; float64 for float64 (under jax.enable_x64).
  """
  return jnp.promote_types(dtype, jnp.float32)
