"""A stored train state against the one a config builds: leaf names, differences, grafting.

Orbax's metadata tree, an abstract state and a live state name the same leaf the same way here
(`params/encoder/conv_in/kernel`, `opt_state/inner_state/2/mu/...`), so a checkpoint written under
another config can be compared leaf by leaf and carried over where it fits.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from absl import logging

from vae_scale.training import optim
from vae_scale.run import reconcile
from vae_scale.errors import ConfigError
from vae_scale.errors import ConversionError

_MAX_LISTED = 10


def _key(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'params/encoder/conv_in/kernel': shape, ...} of a state, abstract state or Orbax metadata
  tree: the same names for the same leaf whichever form it takes (None leaves are absent)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
  return {"/".join(_key(k) for k in path): tuple(leaf.shape) for path, leaf in leaves
          if leaf is not None}


def architecture_refusal(workdir: str, step: int, stored: dict, wanted: dict) -> ConfigError:
  """The one-line refusal of a checkpoint whose autoencoder parameters have other shapes."""
  diff = [k for k in sorted(set(stored) | set(wanted)) if k.startswith("params/")
          and stored.get(k) != wanted.get(k)]
  listed = ", ".join(f"{k[7:]} {list(stored[k]) if k in stored else 'absent'} -> "
                     f"{list(wanted[k]) if k in wanted else 'absent'}" for k in diff[:_MAX_LISTED])
  return ConfigError(
      f"config.model: the checkpoint of step {step} in {workdir} has parameters of another shape "
      f"({len(diff)} differ: {listed}); nothing was changed on disk. Either train this "
      f"architecture in a new --workdir, or rerun with the config.model the checkpoint was "
      f"written with")


def log_difference(step: int, stored: dict, wanted: dict) -> None:
  """For a checkpoint without a stored config: which parts of the state are kept or fresh."""
  groups = lambda names: sorted({n.split("/")[0] for n in names})
  fresh = groups(set(wanted) - set(stored))
  dropped = groups(set(stored) - set(wanted))
  if fresh or dropped:
    logging.warning("resume at step %d: the checkpoint (no stored config: an older vae_scale) "
                    "differs from this config's state; starting fresh: %s; not carried over: %s",
                    step, ", ".join(fresh) or "nothing", ", ".join(dropped) or "nothing")


def graft(abstract: Any, restored: Any, fresh: Callable[[], Any]) -> Any:
  """The state the current config builds, every leaf taken from `restored` where it has it (with
  the same shape); the rest from a fresh init (or, for a new EMA, from the restored parameters).

  A stored leaf of another shape is only possible outside the autoencoder's parameters (those are
  refused before): the VF projection and its Adam moments after a new loss.vf_feature_dim.
  """
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  names = ["/".join(_key(k) for k in path) for path, _ in leaves_with_path]
  shapes = {n: tuple(leaf.shape) for n, (_, leaf) in zip(names, leaves_with_path)}
  got = {n: v for n, v in flat(restored).items() if n not in shapes or
         tuple(v.shape) == shapes[n]}
  fresh_leaves = flat(fresh()) if any(n not in got for n in names) else {}
  out = []
  for name in names:
    if name in got:
      out.append(got[name])
    elif name.startswith("ema_params/") and "params/" + name[11:] in got:
      out.append(jax.numpy.copy(got["params/" + name[11:]]))  # EMA starts from the params.
    else:
      out.append(fresh_leaves[name])
  return jax.tree_util.tree_unflatten(treedef, out)


def flat(tree: Any) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key(k) for k in path): leaf for path, leaf in leaves}


def reset_moments(state: Any, plan: reconcile.Plan) -> Any:
  """Zeroes the Adam moments of parameters whose role `freeze_encoder` switched."""
  if not plan.freeze_changed:
    return state
  def reset(path, leaf):
    name = "/".join(_key(k) for k in path)
    moment = "/mu/" in name or "/nu/" in name
    switched = any(f"/{side}/" in name for side in optim.ENCODER_SIDE)
    return jax.numpy.zeros_like(leaf) if moment and switched else leaf
  return state.replace(opt_state=jax.tree_util.tree_map_with_path(reset, state.opt_state))


def check_shapes(stored: Any, abstract: Any, source: str) -> None:
  """Compares a stored tree with the expected one; one ConversionError lists the mismatches."""
  got = leaf_shapes(stored) if stored is not None else {}
  want = leaf_shapes(abstract)
  problems = [f"missing    {k} {list(s)}" for k, s in want.items() if k not in got]
  problems += [f"shape      {k}: stored {list(got[k])}, the config expects {list(s)}"
               for k, s in want.items() if k in got and got[k] != s]
  problems += [f"unexpected {k} {list(s)}" for k, s in got.items() if k not in want]
  if problems:
    listed = "\n  ".join(problems[:_MAX_LISTED])
    raise ConversionError(f"{source}: {len(problems)} parameter(s) don't match the model config. "
                          f"First mismatches:\n  {listed}\nCheck that config.model describes "
                          "the architecture these weights were trained with.")
