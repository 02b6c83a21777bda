"""The device mesh, shardings and global-batch assembly. The only module that knows the mesh layout.

Training is data parallel over one mesh axis, 'data', spanning every device. Its device order
follows the interconnect: on one TPU slice, `mesh_utils.create_device_mesh` walks the chips'
ICI torus; across several slices (Multislice), devices are grouped slice by slice
(`create_hybrid_device_mesh`), so a gradient all-reduce runs within each slice over ICI and
only then between slices over the slower data-center network (DCN). Models and steps see just
the one axis.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from absl import logging
import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def slice_index(device: Any) -> int:
  """The TPU slice a device belongs to; 0 where the platform has no slices (CPU, most GPUs)."""
  return getattr(device, "slice_index", 0) or 0


def device_order(devices: Sequence[Any]) -> np.ndarray:
  """The devices as a 1-D array in interconnect-friendly order, slice by slice.

  Args:
    devices: every device of the mesh (e.g. jax.devices()), in any order.
  Returns:
    A [len(devices)] object array: slice 0's devices first, then slice 1's, ...; within a slice,
    the order `mesh_utils.create_device_mesh` picks for a 1-D mesh (the given order on CPU).
    Devices it cannot place (a subset with holes in the torus, unequal slices) keep their given
    order within their slice, with a warning.
  """
  devices = list(devices)
  by_slice = [list(group) for _, group in
              itertools.groupby(sorted(devices, key=slice_index), key=slice_index)]
  try:
    if len(by_slice) > 1:
      per_slice = len(devices) // len(by_slice)
      ordered = mesh_utils.create_hybrid_device_mesh((per_slice,), (len(by_slice),), devices)
    else:
      ordered = mesh_utils.create_device_mesh((len(devices),), devices)
    return np.asarray(ordered, dtype=object).reshape(-1)
  except (ValueError, AssertionError, NotImplementedError) as e:
    logging.warning("Using the given device order within each slice: %s", e)
    return np.asarray([d for group in by_slice for d in group], dtype=object)


def create_mesh(devices: Sequence[Any] | None = None) -> Mesh:
  """A 1-D data-parallel mesh with axis 'data' over all (global) devices, in `device_order`."""
  devices = jax.devices() if devices is None else devices
  return Mesh(device_order(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def shardings_for(tree: Any, mesh: Mesh) -> Any:
  """The sharding of every leaf of a model or train state: the one place that decides it.

  Tools (train, evaluate, encode, bench) take state shardings from here rather than building
  their own, for `jax.jit(in/out_shardings=...)`, `jax.device_put` and Orbax restore targets
  (`abstract_target`), so a change of layout (e.g. sharding large parameters) happens once.

  Args:
    tree: a pytree of arrays or ShapeDtypeStructs (e.g. `jax.eval_shape(init, key)`); None
      subtrees (an absent EMA) stay None.
    mesh: the data mesh.
  Returns:
    A NamedSharding per leaf: replicated, as data parallelism keeps a full copy per device.
  """
  return jax.tree.map(lambda _: replicated(mesh), tree)


def abstract_target(tree: Any, mesh: Mesh) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings_for(tree, mesh)`: what Orbax restores
  into, whatever mesh the checkpoint was written from."""
  return with_shardings(tree, shardings_for(tree, mesh))


def replicate_tree(tree: Any, mesh: Mesh) -> Any:
  """A replicated sharding for every leaf of a (possibly abstract) pytree; `shardings_for`."""
  return shardings_for(tree, mesh)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's numpy batch into one global jax.Array split over 'data'.

  Args:
    local_batch: this process's share, arrays [global_batch / process_count, ...].
    mesh: the data mesh.
  Returns:
    Arrays of shape [global_batch, ...], sharded on the leading axis. A process's rows land on
    its own devices, wherever the mesh order puts them.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def rows_of_process(shard_rows: Sequence[tuple[int, slice]], process_index: int,
                    global_batch_size: int) -> np.ndarray:
  """The global rows a process's local rows fill, from (process of a device, its row slice).

  `jax.make_array_from_process_local_data` hands a process's devices the slices of its local
  batch in the order of the global rows they hold: local row i becomes the i-th smallest of
  the process's global rows, wherever the mesh puts its devices.
  """
  slices = sorted({(s.start or 0, global_batch_size if s.stop is None else s.stop)
                   for p, s in shard_rows if p == process_index})
  if not slices:
    raise ValueError(f"process {process_index} holds no rows of the batch")
  return np.concatenate([np.arange(a, b) for a, b in slices])


def process_rows(mesh: Mesh, global_batch_size: int,
                 process_index: int | None = None) -> np.ndarray:
  """The rows of every global batch that `global_batch` fills from a process's local batch.

  Input pipelines load exactly these examples of each global batch (`data.sampler`), so the
  assembled global batch is the same for any process count and any device order. On a mesh that
  lists devices process by process (CPU, GPU hosts) they are [p*b, (p+1)*b), b = B / P.

  Args:
    mesh: the data mesh.
    global_batch_size: B.
    process_index: default this process.
  Returns:
    [B / process_count] ints in [0, B): local row i is global row rows[i].
  """
  p = jax.process_index() if process_index is None else process_index
  index_map = batch_sharding(mesh).devices_indices_map((global_batch_size,))
  return rows_of_process([(d.process_index, idx[0]) for d, idx in index_map.items()], p,
                         global_batch_size)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings, the restore target for Orbax."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
