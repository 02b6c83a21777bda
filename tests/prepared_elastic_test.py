"""A run on a prepared dataset saved by 2 processes resumes on 1 with the same global batches: the
elastic sampler reads a packed dataset as it reads any source (elastic_test's recording trainer)."""

import json
import os

import pytest

from conftest import encode_image
from conftest import random_photo
from conftest import tiny_config
from conftest import write_files
from elastic_test import GLOBAL_BATCH
from elastic_test import _digest
from elastic_test import _log_tail
from elastic_test import _recorded
from elastic_test import _run
from elastic_test import _take
from vae_scale.tools import prepare as prepare_lib


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_run_on_a_prepared_dataset_saved_by_2_processes_resumes_on_1(tmp_path):
  from vae_scale.data import pipeline  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path / "photos")
  write_files(folder, {f"p{i:02d}.jpg": encode_image(random_photo(48, 36, seed=i), "JPEG")
                       for i in range(40)})
  prepare_lib.prepare(prepare_lib.PrepareOptions(
      src=folder, out=str(tmp_path / "data"), name="photos", max_side=24, image_size=16,
      num_workers=1, eval_fraction=0.1))
  data = ["--config.data.source=tfds",
          f"--config.data.tfds_name={tmp_path / 'data' / 'photos'}"]
  cache, workdir = str(tmp_path / "jax_cache"), str(tmp_path / "run")
  consumed = {}
  for name, procs, devices, first, last in [("a", 2, 2, 0, 4), ("b", 1, 4, 4, 8)]:
    record = str(tmp_path / f"{name}_rec")
    codes = _run(workdir, procs, devices, last, record, cache, extra_flags=data)
    assert codes == [0] * procs, (name, codes, _log_tail(record, procs))
    consumed.update(_recorded(record, procs, first))
    position = json.loads(open(os.path.join(workdir, "checkpoints", str(last), "data",
                                            "metadata")).read())
    assert position["global_examples"] == last * GLOBAL_BATCH and "photos" in position["source"]
  config = tiny_config(**{"global_batch_size": GLOBAL_BATCH, "data.source": "tfds",
                          "data.tfds_name": str(tmp_path / "data" / "photos")})
  want = _take(pipeline.create_train_dataset(config, 0, 1), 8)
  assert sorted(consumed) == list(range(8))
  for step in range(8):  # ~36 training images: the 64 examples cross an epoch boundary.
    expected = {r: _digest(want[step]["image"][r]) for r in range(GLOBAL_BATCH)}
    assert consumed[step] == expected, f"step {step}"
