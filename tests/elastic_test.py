"""Elastic scale: a run resumes on another process count, device count or device order, and the
global batches after the resume are the ones an uninterrupted run reads, example for example.

The multi-process test runs the real trainer (this file as a script: `vae_scale.main` with a hook
that records a digest of every row of every global batch the train step consumed) in three
segments on 2, 1 and 4 processes, on a dataset packed by `vae_scale.prepare` (the pod's input: the
elastic sampler reads it as it reads any random-access source), and compares with an uninterrupted
run.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_ENV = "VAE_SCALE_TEST_RECORD"  # The script's hook appends to $RECORD_p<process>.jsonl.
NUM_STEPS = 12
GLOBAL_BATCH = 8
RUN_FLAGS = [f"--config={os.path.join(REPO, 'tests', 'tiny_config.py')}",
             f"--config.global_batch_size={GLOBAL_BATCH}", "--config.checkpoint_every_steps=4",
             "--config.log_every_steps=4", "--config.eval_every_steps=1000",
             "--config.image_every_steps=1000"]
# Worst relative parameter difference (max |a - b| / max |a| per array) between the elastic run
# (4 devices on 2, 1, 4 processes) and the uninterrupted one (4 devices, 1 process) after 12
# steps: measured 4.5e-6 on synthetic images (encoder/down_blocks/0/resnets/0/norm2/norm/bias),
# within the bound on the prepared photographs too; reduction order only.
PARAM_RTOL = 2e-5


def _digest(row: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(row).tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- rows of the mesh


@dataclasses.dataclass(frozen=True)
class _FakeTpu:
  """What mesh_utils reads of a TPU device (sharding_test builds whole slices of them)."""

  id: int
  coords: tuple[int, int, int]
  process_index: int
  slice_index: int = 0
  device_kind: str = "TPU v4"
  platform: str = "tpu"
  core_on_chip: int = 0


def test_rows_follow_the_mesh_even_where_it_interleaves_the_hosts():
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from vae_scale.training import sharding  # pylint: disable=g-import-not-at-top
  from vae_scale.data import pipeline  # pylint: disable=g-import-not-at-top
  # A v4-16 slice: a 2x2x2 torus of chips, 4 per host (host = z plane), listed host by host.
  chips = [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]
  devices = [_FakeTpu(id=i, coords=c, process_index=i // 4) for i, c in enumerate(chips)]
  order = sharding.device_order(devices)
  batch = 16
  per_device = batch // len(order)
  shard_rows = [(d.process_index, slice(m * per_device, (m + 1) * per_device))
                for m, d in enumerate(order)]  # What a 1-D NamedSharding gives mesh position m.
  rows = [sharding.rows_of_process(shard_rows, p, batch) for p in range(2)]
  assert sorted(np.concatenate(rows)) == list(range(batch))
  assert list(rows[0]) != list(range(8))  # The torus order alternates between the two hosts.
  # Streams loading those rows assemble the 1-process global batches.
  config = tiny_config(global_batch_size=batch)
  want = [b["image"] for b in _take(pipeline.create_train_dataset(config, 0, 1, start=32), 3)]
  streams = [_take(pipeline.create_train_dataset(config, p, 2, start=32, rows=rows[p]), 3)
             for p in range(2)]
  for s in range(3):
    got = np.zeros_like(want[s])
    for p in range(2):
      got[rows[p]] = streams[p][s]["image"]
    np.testing.assert_array_equal(got, want[s])


def test_rows_of_a_process_by_process_mesh_are_contiguous():
  import jax  # pylint: disable=g-import-not-at-top
  from vae_scale.training import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh()
  np.testing.assert_array_equal(sharding.process_rows(mesh, 16), np.arange(16))
  # 4 processes of 2 devices each, listed process by process: [2p*2, (2p+2)*2).
  shard_rows = [(m // 2, slice(2 * m, 2 * m + 2)) for m in range(8)]
  for p in range(4):
    np.testing.assert_array_equal(sharding.rows_of_process(shard_rows, p, 16),
                                  np.arange(4 * p, 4 * p + 4))
  assert jax.process_count() == 1


def test_a_process_count_that_does_not_divide_the_batch_names_the_nearest_that_do():
  from vae_scale.config import schema  # pylint: disable=g-import-not-at-top
  from vae_scale.errors import ConfigError  # pylint: disable=g-import-not-at-top
  schema.check_batch(24, num_devices=8, num_processes=4)
  with pytest.raises(ConfigError, match=r"^config.global_batch_size: 20 is not divisible by the "
                     r"3 devices; use a multiple of 3 \(the nearest: 18 or 21\)$"):
    schema.check_batch(20, num_devices=3, num_processes=3)
  with pytest.raises(ConfigError, match=r"4 is not divisible by the 8 devices; use a multiple "
                     r"of 8 \(the nearest: 8\)$"):
    schema.check_batch(4, num_devices=8)
  with pytest.raises(ConfigError, match=r"24 is not divisible by the 8 devices x 2 micro-batches "
                     r"\(optimizer.grad_accum_steps\); use a multiple of 16 \(the nearest: 16 or "
                     r"32\)$"):
    schema.check_batch(24, num_devices=8, grad_accum_steps=2)


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


# --------------------------------------------------------------------------- model state


_RESTORE_ON_4 = r"""
import json, sys
import jax, numpy as np
from absl import flags
flags.FLAGS.mark_as_parsed()
sys.path.insert(0, {tests!r})
import tiny_config  # Not conftest: it would ask for 8 devices.
from vae_scale.data import pipeline
from vae_scale.run import checkpoints
from vae_scale.run import resume
from vae_scale.run import state_tree
from vae_scale.training import programs
from vae_scale.training import sharding
config = tiny_config.get_config()
config.global_batch_size = 8
assert jax.device_count() == 4, jax.devices()
mesh = sharding.create_mesh()
progs = programs.build(config, mesh)
manager = checkpoints.create_manager({workdir!r}, config)
rows = sharding.process_rows(mesh, 8)
restored = resume.restore_latest(manager, config=config, workdir={workdir!r},
                                 abstract_state=progs.abstract_state, replicated=progs.replicated)
manager.close()
state = resume.state_from(restored, progs.abstract_state, progs.init)
position = resume.data_position(restored, config)
data_iter = iter(pipeline.create_train_dataset(config, 0, 1, start=position.global_examples, rows=rows))
stored, _ = checkpoints.read_state({workdir!r}, 3)
leaves = jax.tree.leaves(state.params)
assert all(len(x.sharding.device_set) == 4 for x in leaves)
got, want = state_tree.flat(state.params), state_tree.flat(stored["params"])
assert sorted(got) == sorted(want) and got
for name, leaf in got.items():
  np.testing.assert_array_equal(np.asarray(leaf), want[name], err_msg=name)
json.dump({{"step": position.step, "examples": position.at(position.step),
           "first": next(data_iter)["image"].tolist()}}, open({out!r}, "w"))
"""


@pytest.mark.slow
def test_a_checkpoint_of_8_devices_restores_on_4(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from vae_scale.run import checkpoints  # pylint: disable=g-import-not-at-top
  from vae_scale.training import programs  # pylint: disable=g-import-not-at-top
  from vae_scale.training import sharding  # pylint: disable=g-import-not-at-top
  from vae_scale.data import pipeline  # pylint: disable=g-import-not-at-top
  from vae_scale.data import sampler  # pylint: disable=g-import-not-at-top
  config = tiny_config(global_batch_size=8)
  assert jax.device_count() == 8
  progs = programs.build(config, sharding.create_mesh())
  state = progs.init()
  # Parameters unlike a fresh init's, so the restore cannot pass by re-initialising.
  state = state.replace(params=jax.tree.map(lambda x: x + 0.25, state.params))
  workdir = str(tmp_path / "run")
  manager = checkpoints.create_manager(workdir, config)
  checkpoints.save(manager, 3, state, sampler.DataPosition(0, 0, 8), config)
  manager.wait_until_finished()
  manager.close()
  out = tmp_path / "restored.json"
  from conftest import cpu_env  # pylint: disable=g-import-not-at-top  (not when run as a script)
  env = cpu_env(4)
  res = subprocess.run([sys.executable, "-c", _RESTORE_ON_4.format(
      tests=os.path.join(REPO, "tests"), workdir=workdir, out=str(out))], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  got = json.loads(out.read_text())
  assert got["step"] == 3 and got["examples"] == 24
  want = _take(pipeline.create_train_dataset(config, 0, 1), 4)[3]["image"]
  np.testing.assert_array_equal(np.asarray(got["first"], np.float32), want)


@pytest.mark.slow
def test_a_checkpoint_with_grain_iterator_states_resumes_at_step_times_batch(tmp_path, caplog):
  import grain  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from vae_scale.run import checkpoints  # pylint: disable=g-import-not-at-top
  from vae_scale.training import programs  # pylint: disable=g-import-not-at-top
  from vae_scale.config import serialize  # pylint: disable=g-import-not-at-top
  from vae_scale.training import sharding  # pylint: disable=g-import-not-at-top
  from vae_scale.run import state_tree  # pylint: disable=g-import-not-at-top
  from vae_scale.run import resume  # pylint: disable=g-import-not-at-top
  from vae_scale.data import pipeline  # pylint: disable=g-import-not-at-top
  from vae_scale.data import sampler  # pylint: disable=g-import-not-at-top
  config = tiny_config(global_batch_size=8)
  progs = programs.build(config, sharding.create_mesh())
  state = progs.init()
  state = state.replace(params=jax.tree.map(lambda x: x - 0.5, state.params))
  workdir = str(tmp_path / "run")
  # What vae_scale wrote before elastic data: Grain's iterator state in the data item.
  old = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(old)
  manager = checkpoints.create_manager(workdir, config)
  manager.save(2, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state),
      data=grain.checkpoint.CheckpointSave(old),
      config=ocp.args.JsonSave(json.loads(serialize.to_json(config)))),
      metrics={checkpoints.HEALTHY: 1.0})
  manager.wait_until_finished()
  manager.close()
  assert os.path.exists(os.path.join(workdir, "checkpoints", "2", "data", "process_0-of-1.json"))
  manager = checkpoints.create_manager(workdir, config)
  with caplog.at_level("WARNING"):
    restored = resume.restore_latest(manager, config=config, workdir=workdir,
                                     abstract_state=progs.abstract_state,
                                     replicated=progs.replicated)
  state_back = resume.state_from(restored, progs.abstract_state, progs.init)
  position = resume.data_position(restored, config)
  data_iter = iter(pipeline.create_train_dataset(config, 0, 1, start=position.global_examples))
  warnings = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
  assert len(warnings) == 1 and "Grain's iterator states of 1 process" in warnings[0], warnings
  assert position.step == 2 and position.at(2) == 16 and not os.path.exists(
      os.path.join(workdir, "checkpoints_damaged"))
  np.testing.assert_array_equal(
      next(data_iter)["image"],
      _take(pipeline.create_train_dataset(config, 0, 1), 3)[2]["image"])
  got, want = state_tree.flat(state_back.params), state_tree.flat(state.params)
  for name, leaf in got.items():
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want[name]), err_msg=name)
  # The next checkpoint of the same manager is in the new format.
  checkpoints.save(manager, 3, state_back, position, config)
  manager.wait_until_finished()
  manager.close()
  record = json.loads(open(os.path.join(workdir, "checkpoints", "3", "data", "metadata")).read())
  assert record["global_examples"] == 24 and record["format"] == sampler.POSITION_FORMAT


# --------------------------------------------------------------------------- real runs


def _run(workdir, num_processes, devices_per_process, num_steps, record, cache_dir,
         timeout=300, extra_flags=()):
  """One run of the real trainer (this file as a script) on num_processes x devices_per_process,
  with `extra_flags` after RUN_FLAGS; returns the launcher's exit code."""
  from vae_scale.tools import local_launch  # pylint: disable=g-import-not-at-top
  env = local_launch.process_env(devices_per_process)
  env.update({RECORD_ENV: record, "JAX_COMPILATION_CACHE_DIR": cache_dir,
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "TF_CPP_MIN_LOG_LEVEL": "3"})
  port = local_launch.free_port()
  args = RUN_FLAGS + [f"--config.num_train_steps={num_steps}", f"--workdir={workdir}",
                      *extra_flags]
  procs = []
  for i in range(num_processes):
    cmd = local_launch.command(i, num_processes, port, args, 20)
    log = open(f"{record}_log_p{i}.txt", "w")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *cmd[3:]], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    log.close()
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [p.returncode for p in procs]


def _recorded(record, num_processes, first_step):
  """{step: {row: digest}} from every process's recording of one run."""
  steps = {}
  for p in range(num_processes):
    with open(f"{record}_p{p}.jsonl") as f:
      for i, line in enumerate(f):
        rows = steps.setdefault(first_step + i, {})
        for row, digest in json.loads(line).items():
          assert int(row) not in rows, (first_step + i, row)  # Each row from one device.
          rows[int(row)] = digest
  return steps


def _log_tail(record, num_processes):
  return "\n".join(open(f"{record}_log_p{p}.txt").read()[-2500:] for p in range(num_processes))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_run_on_a_prepared_dataset_saved_by_2_processes_resumes_on_1_then_4_processes(tmp_path):
  from conftest import encode_image, random_photo, tiny_config, write_files  # pylint: disable=g-import-not-at-top
  from vae_scale.run import checkpoints  # pylint: disable=g-import-not-at-top
  from vae_scale.data import pipeline  # pylint: disable=g-import-not-at-top
  from vae_scale.tools import prepare  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path / "photos")
  write_files(folder, {f"p{i:02d}.jpg": encode_image(random_photo(48, 36, seed=i), "JPEG")
                       for i in range(40)})
  prepare.prepare(prepare.PrepareOptions(src=folder, out=str(tmp_path / "data"), name="photos",
                                         max_side=24, image_size=16, num_workers=1,
                                         eval_fraction=0.1))
  data = {"data.source": "tfds", "data.tfds_name": str(tmp_path / "data" / "photos")}
  flags_ = [f"--config.{k}={v}" for k, v in data.items()]
  cache = str(tmp_path / "jax_cache")  # The 1-process runs compile the same programs.
  straight, elastic = str(tmp_path / "straight"), str(tmp_path / "elastic")
  segments = [("a", 2, 2, 0, 4), ("b", 1, 4, 4, 8), ("c", 4, 1, 8, NUM_STEPS)]
  record = str(tmp_path / "straight_rec")
  assert _run(straight, 1, 4, NUM_STEPS, record, cache, extra_flags=flags_) == [0], _log_tail(
      record, 1)
  consumed = _recorded(record, 1, 0)
  for name, procs, devices, first, last in segments:
    record = str(tmp_path / f"{name}_rec")
    codes = _run(elastic, procs, devices, last, record, cache, extra_flags=flags_)
    assert codes == [0] * procs, (name, codes, _log_tail(record, procs))
    got = _recorded(record, procs, first)
    assert sorted(got) == list(range(first, last)), name
    consumed.update({f"{name}{s}": rows for s, rows in got.items()})
    position = json.loads(open(os.path.join(elastic, "checkpoints", str(last), "data",
                                            "metadata")).read())
    assert position["global_examples"] == last * GLOBAL_BATCH, position
    assert "photos" in position["source"], position
  # Every global batch the trainer consumed, on every layout, is the uninterrupted stream's (~36
  # training images: the 96 examples cross two epoch boundaries).
  want = _take(pipeline.create_train_dataset(
      tiny_config(global_batch_size=GLOBAL_BATCH, **data), 0, 1), NUM_STEPS)
  for name, _, _, first, last in segments:
    for s in range(first, last):
      expected = {r: _digest(want[s]["image"][r]) for r in range(GLOBAL_BATCH)}
      assert consumed[s] == expected, f"straight run, step {s}"
      assert consumed[f"{name}{s}"] == expected, f"segment {name}, step {s}"
  # The parameters agree up to the reduction order of the device counts.
  a, _ = checkpoints.read_state(straight, NUM_STEPS, keys=("params",))
  b, _ = checkpoints.read_state(elastic, NUM_STEPS, keys=("params",))
  worst, key_bias = _param_differences(a["params"], b["params"])
  print(f"worst relative parameter difference {worst:.3g}; attention key biases differ by up to "
        f"{key_bias:.3g}")
  assert worst <= PARAM_RTOL, worst
  # An attention key bias adds the same number to every logit of a query: softmax ignores it, so
  # its exact gradient is 0 and Adam turns rounding noise into steps of up to ~learning_rate.
  assert key_bias <= 2 * NUM_STEPS * tiny_config().optimizer.learning_rate, key_bias


def _param_differences(a, b):
  """(worst max|a - b| / max|a| over the arrays, worst max|a - b| of the attention key biases)."""
  from vae_scale.run import state_tree  # pylint: disable=g-import-not-at-top
  fa, fb = state_tree.flat(a), state_tree.flat(b)
  assert sorted(fa) == sorted(fb)
  worst = key_bias = 0.0
  for name, x in fa.items():
    x, y = np.asarray(x, np.float64), np.asarray(fb[name], np.float64)
    diff = float(np.max(np.abs(x - y)))
    if name.endswith("to_k/bias"):
      key_bias = max(key_bias, diff)
    else:
      worst = max(worst, diff / max(float(np.max(np.abs(x))), 1e-30))
  return worst, key_bias


# --------------------------------------------------------------------------- the recording trainer


def _record_global_batches(path: str) -> None:
  """Wraps `sharding.global_batch` (what the train loop calls each step) to append, per step, a
  digest of every global row this process's devices received."""
  import jax  # pylint: disable=g-import-not-at-top
  from vae_scale.training import sharding  # pylint: disable=g-import-not-at-top
  real = sharding.global_batch

  def recording(local_batch, mesh):
    out = real(local_batch, mesh)
    if "weight" in local_batch:  # An evaluation batch.
      return out
    rows = {}
    for shard in out["image"].addressable_shards:
      data = np.asarray(shard.data)
      for i in range(data.shape[0]):
        rows[(shard.index[0].start or 0) + i] = _digest(data[i])
    with open(f"{path}_p{jax.process_index()}.jsonl", "a") as f:
      f.write(json.dumps(rows) + "\n")
    return out

  sharding.global_batch = recording


def _trainer() -> None:
  """`python -m vae_scale.main` with `_record_global_batches` installed."""
  from vae_scale.run import preemption  # pylint: disable=g-import-not-at-top
  watch = preemption.Watch().install()
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vae_scale import cli  # pylint: disable=g-import-not-at-top
  from vae_scale import main as vae_main  # pylint: disable=g-import-not-at-top
  _record_global_batches(os.environ[RECORD_ENV])
  flags.mark_flags_as_required(["config", "workdir"])
  from vae_scale.run import cloud  # pylint: disable=g-import-not-at-top
  distributed, diagnostics = cli.define_distributed_flags(), cloud.define_flags()
  cli.run(lambda argv: vae_main.main(argv, distributed, diagnostics, watch))


if __name__ == "__main__":
  _trainer()
