"""The mesh and global-batch layout on 8 simulated devices, and the device order of TPU slices and
Multislices built from fake TPU devices (what mesh_utils reads: platform, device_kind, coords,
core_on_chip, slice_index)."""

import dataclasses
import random

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from vae_scale.training import sharding


def test_mesh_spans_all_devices_on_data_axis():
  mesh = sharding.create_mesh()
  assert jax.device_count() == 8
  assert dict(mesh.shape) == {"data": 8}
  # CPU devices have no torus: the given order stands.
  assert list(mesh.devices.flat) == jax.devices()
  assert list(sharding.create_mesh(jax.devices()[::-1]).devices.flat) == jax.devices()[::-1]


@pytest.mark.parametrize("devices", [None, "reversed"])
def test_global_batch_is_split_row_wise_over_devices(devices):
  mesh = sharding.create_mesh(jax.devices()[::-1] if devices else None)
  local = {"image": np.arange(16 * 2 * 2 * 3, dtype=np.float32).reshape(16, 2, 2, 3)}
  batch = sharding.global_batch(local, mesh)["image"]
  assert batch.shape == (16, 2, 2, 3)
  assert batch.sharding.spec == sharding.batch_sharding(mesh).spec
  shards = sorted(batch.addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == 8
  for i, shard in enumerate(shards):
    assert shard.data.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(np.asarray(shard.data), local["image"][2 * i:2 * i + 2])
  # Each device holds exactly its rows, on its own device, in mesh order.
  assert [s.device for s in shards] == list(mesh.devices.flat)
  np.testing.assert_array_equal(np.asarray(batch), local["image"])


def test_state_shardings_and_restore_target():
  mesh = sharding.create_mesh()
  tree = {"a": jax.ShapeDtypeStruct((3,), np.float32), "b": [jax.ShapeDtypeStruct((), np.int32)],
          "ema": None}
  sh = sharding.shardings_for(tree, mesh)
  assert sh["a"].spec == sharding.replicated(mesh).spec and sh["ema"] is None
  assert sharding.replicate_tree(tree, mesh) == sh
  target = sharding.abstract_target(tree, mesh)
  assert target["b"][0].sharding == sh["b"][0] and target["a"].shape == (3,)
  assert target == sharding.with_shardings(tree, sh)
  assert target["ema"] is None


# -- TPU slices and Multislices from fake devices --------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FakeTpu:
  id: int
  coords: tuple[int, int, int]
  slice_index: int
  process_index: int
  device_kind: str = "TPU v4"
  platform: str = "tpu"
  core_on_chip: int = 0


def _slice(shape, slice_id, first_id, chips_per_host=4, kind="TPU v4"):
  """One slice's devices in the order jax.devices() lists them (process by process, then z, y, x),
  hosts numbered after the previous slices' hosts (JAX numbers processes slice by slice)."""
  x_size, y_size, z_size = shape
  hosts_per_slice = x_size * y_size * z_size // chips_per_host
  devices = []
  for i, (z, y, x) in enumerate(
      (z, y, x) for z in range(z_size) for y in range(y_size) for x in range(x_size)):
    devices.append(FakeTpu(id=first_id + i, coords=(x, y, z), slice_index=slice_id,
                           process_index=slice_id * hosts_per_slice + i // chips_per_host,
                           device_kind=kind))
  return devices


def _multislice(num_slices, shape, kind="TPU v4"):
  n = shape[0] * shape[1] * shape[2]
  devices = [d for s in range(num_slices) for d in _slice(shape, s, s * n, kind=kind)]
  random.Random(0).shuffle(devices)  # Whatever order they come in.
  return devices


@pytest.mark.parametrize("num_slices, shape, kind", [
    (2, (2, 2, 2), "TPU v4"),  # Two v4-16.
    (4, (2, 2, 4), "TPU v4"),  # Four v4-32.
    (2, (16, 16, 1), "TPU v5 lite"),  # Two v5litepod-256: configs/pods.py:2xv5e-256.
])
def test_multislice_order_is_slice_major(num_slices, shape, kind):
  devices = _multislice(num_slices, shape, kind)
  order = sharding.device_order(devices)
  per_slice = len(devices) // num_slices
  assert order.shape == (len(devices),)
  assert sorted(d.id for d in order) == sorted(d.id for d in devices)  # Each device once.
  # Slice-major: slice s holds positions [s * per_slice, (s + 1) * per_slice) of the 'data' axis,
  # so the cross-slice (DCN) part of an all-reduce is between contiguous blocks.
  assert [d.slice_index for d in order] == [s for s in range(num_slices) for _ in range(per_slice)]
  for s in range(num_slices):
    block = list(order[s * per_slice:(s + 1) * per_slice])
    mine = [d for d in devices if d.slice_index == s]
    # Within a slice: the ICI order mesh_utils picks for that slice alone.
    assert block == list(mesh_utils.create_device_mesh((per_slice,), mine).flat)


def test_multislice_order_within_a_slice_follows_the_torus():
  # A v4 slice (no device-kind special case) is laid out x-major over its 3-D torus coordinates,
  # whatever order the devices were listed in.
  order = sharding.device_order(_multislice(2, (2, 2, 2)))
  coords = [(d.slice_index, *d.coords) for d in order]
  assert coords == sorted(coords)


def test_one_tpu_slice_uses_create_device_mesh():
  devices = _slice((2, 4, 1), 0, 0, kind="TPU v5 lite")  # v5litepod-8: one host, 8 chips.
  order = sharding.device_order(devices)
  assert list(order) == list(mesh_utils.create_device_mesh((8,), devices).flat)
  assert list(order) != devices  # v5e's tray ring, not the listing order.


@pytest.mark.parametrize("devices", [
    _slice((2, 2, 2), 0, 0)[:3],  # A subset with a hole in the torus.
    _slice((2, 2, 1), 0, 0)[::-1] + _slice((2, 2, 2), 1, 4),  # Slices of different sizes.
])
def test_devices_mesh_utils_cannot_place_keep_their_order_slice_by_slice(devices):
  order = list(sharding.device_order(devices))
  assert order == sorted(devices, key=lambda d: d.slice_index)  # Stable: given order per slice.


def test_devices_without_slices_are_one_slice():
  # CPU devices (and the multi-process CPU rehearsal) have no slice_index.
  assert not hasattr(jax.devices()[0], "slice_index")
  assert list(sharding.device_order(jax.devices())) == jax.devices()
