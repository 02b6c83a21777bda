"""The Beam pipeline (DirectRunner) writes the examples the local process pool writes, in the same
order, with the same report."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from image_collections_test import make_folder
from image_collections_test import webdataset_samples
from image_collections_test import write_tar
from prepare_test import _options
from vae_scale.data import packed_beam
from vae_scale.tools import prepare as prepare_lib


def _examples(out, split):
  source = tfds.data_source("pack", split=split, data_dir=str(out),
                            decoders={"image": tfds.decode.SkipDecoding()})
  return [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in source[i].items()}
          for i in range(len(source))]


def test_pipeline_options_take_tfds_format():
  options = packed_beam.pipeline_options("runner=DirectRunner, direct_num_workers=2")
  assert options.get_all_options()["runner"] == "DirectRunner"
  assert options.get_all_options()["direct_num_workers"] == 2


@pytest.mark.slow
def test_beam_directrunner_writes_what_the_local_pool_writes(tmp_path):
  folder = make_folder(str(tmp_path))
  for s in range(2):  # The folder's images and two tars, in one brace list.
    write_tar(os.path.join(folder, "tars", f"{s}.tar"), webdataset_samples(s))
  src = f"{folder}/{{big,dup,bad}}"
  local = prepare_lib.prepare(_options(src, tmp_path / "local", eval_fraction=0.3))
  beam = prepare_lib.prepare(_options(src, tmp_path / "beam", eval_fraction=0.3,
                                      beam_pipeline_options="runner=DirectRunner"))
  for split in ("train", "validation"):
    assert _examples(tmp_path / "beam", split) == _examples(tmp_path / "local", split), split
  on_disk = [json.load(open(tmp_path / d / "pack" / "1.0.0" / "prepare_report.json"))
             for d in ("local", "beam")]
  assert on_disk[0] == on_disk[1]
  assert local["duplicates_dropped"] == beam["duplicates_dropped"] == 1
  tars = prepare_lib.prepare(_options(os.path.join(folder, "tars", "*.tar"), tmp_path / "t1"))
  tars_beam = prepare_lib.prepare(_options(os.path.join(folder, "tars", "*.tar"), tmp_path / "t2",
                                           beam_pipeline_options="runner=DirectRunner"))
  assert _examples(tmp_path / "t2", "train") == _examples(tmp_path / "t1", "train")
  assert tars["skipped_by_reason"] == tars_beam["skipped_by_reason"] == {
      "no_image": 2, "not_an_image": 4}
