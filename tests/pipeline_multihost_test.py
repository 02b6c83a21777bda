"""Two JAX processes on localhost read disjoint shares of a folder that together cover it: each the
rows of every global batch that the mesh puts on its devices, so that together they read exactly
the global batches of one process.

Each process is this file run as a script: it joins `jax.distributed` (CPU), builds the real folder
pipeline with jax.process_index()/process_count() and the mesh's rows, and writes the example
indices it saw.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

NUM_FILES = 48  # 2 processes x 3 batches x 8 per process = one epoch of train examples.
PER_PROCESS_BATCH = 8
TIMEOUT_S = 180


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_folder(folder):
  """PNG files whose constant colour encodes their index, written in shuffled order."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(folder, "b"), exist_ok=True)
  for i in np.random.default_rng(0).permutation(NUM_FILES):
    sub = "b" if i % 3 else ""
    Image.new("RGB", (20, 24), (int(i), 255 - int(i), 7)).save(
        os.path.join(folder, sub, f"{(i * 37) % 101:03d}.png"))


def _indices(images) -> list[int]:
  return [int(round((float(x) + 1) * 127.5)) for x in images[:, 0, 0, 0]]


def _worker(process_id: int, port: int, folder: str, workdir: str, out: str) -> None:
  """One process: join the cluster, read one epoch of its share, write what it saw."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, initialization_timeout=TIMEOUT_S)
  flags.FLAGS.mark_as_parsed()
  from vae_scale.training import sharding  # pylint: disable=g-import-not-at-top
  from vae_scale.data import pipeline  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("demo", os.path.join(repo, "configs", "demo.py"))
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config()
  config.image_size = 16
  config.data.source = "folder"
  config.data.path = config.data.eval_path = folder
  config.data.num_workers = 0
  config.global_batch_size = 2 * PER_PROCESS_BATCH
  config.num_eval_images = NUM_FILES
  pi, pc = jax.process_index(), jax.process_count()
  rows = sharding.process_rows(sharding.create_mesh(), config.global_batch_size)
  train = iter(pipeline.create_train_dataset(config, pi, pc, workdir=workdir, rows=rows))
  batches = [next(train) for _ in range(NUM_FILES // (pc * PER_PROCESS_BATCH))]
  eval_ds = pipeline.create_eval_dataset(config, pi, pc, workdir=workdir)
  eval_seen = [i for b in pipeline.eval_batches(config, eval_ds, pc)
               for i in _indices(b["image"][b["weight"] > 0])]  # Not the weight-0 padding.
  with open(out, "w") as f:
    json.dump({"process": [pi, pc], "devices": jax.device_count(), "rows": rows.tolist(),
               "train": [i for b in batches for i in _indices(b["image"])],
               "skipped": sum(int(b["skipped"].sum()) for b in batches),
               "batch": list(batches[0]["image"].shape), "eval": eval_seen}, f)
  jax.distributed.shutdown()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_read_disjoint_shares_that_cover_the_folder(tmp_path):
  folder, workdir = str(tmp_path / "images"), str(tmp_path / "work")
  _write_folder(folder)
  port = _free_port()
  from conftest import cpu_env  # pylint: disable=g-import-not-at-top  (not when run as a script)
  env = cpu_env(2, TF_CPP_MIN_LOG_LEVEL="3")
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), folder, workdir,
                             str(tmp_path / f"seen_{i}.json")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"the two processes did not finish in {TIMEOUT_S} s (hung?)")
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
  seen = [json.loads((tmp_path / f"seen_{i}.json").read_text()) for i in range(2)]
  assert [s["process"] for s in seen] == [[0, 2], [1, 2]]
  assert all(s["devices"] == 4 and s["batch"] == [PER_PROCESS_BATCH, 16, 16, 3] for s in seen)
  a, b = (set(s["train"]) for s in seen)
  assert len(a) == len(seen[0]["train"]) == NUM_FILES // 2 and not a & b
  assert a | b == set(range(NUM_FILES)) and seen[0]["skipped"] == seen[1]["skipped"] == 0
  # The mesh lists the devices process by process: rows [p*8, (p+1)*8) of each global batch, and
  # the two shares are the global batches one process reads, split in halves.
  assert [s["rows"] for s in seen] == [list(range(8)), list(range(8, 16))]
  one = _one_process_indices(folder, len(seen[0]["train"]) // PER_PROCESS_BATCH)
  for s, batch in enumerate(one):
    assert seen[0]["train"][8 * s:8 * s + 8] + seen[1]["train"][8 * s:8 * s + 8] == batch
  ea, eb = (set(s["eval"]) for s in seen)
  assert not ea & eb and ea | eb == set(range(NUM_FILES))
  assert len(seen[0]["eval"]) + len(seen[1]["eval"]) == NUM_FILES  # Each held-out image once.
  assert len(os.listdir(os.path.join(workdir, "file_lists"))) == 2  # One listing + its metadata.


def _one_process_indices(folder, num_batches):
  """The indices of the first global batches (of 16) one process reads from `folder`."""
  from conftest import folder_config  # pylint: disable=g-import-not-at-top
  from vae_scale.data import pipeline  # pylint: disable=g-import-not-at-top
  config = folder_config(folder, global_batch_size=2 * PER_PROCESS_BATCH)
  it = iter(pipeline.create_train_dataset(config, 0, 1))
  return [_indices(next(it)["image"]) for _ in range(num_batches)]


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
