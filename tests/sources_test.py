"""sources: the sample photographs, folder paths held compactly, TFDS, and make_source's errors."""

import pickle

import pytest
import tensorflow_datasets as tfds

from conftest import tiny_config
from vae_scale.data import transforms
from vae_scale.data import pipeline
from vae_scale.data import sources
from vae_scale.errors import ConfigError
from vae_scale.errors import DataError


def test_samples_source_gives_crops_of_real_photos():
  config = tiny_config(**{"data.source": "samples", "image_size": 32})
  batch = next(iter(pipeline.create_train_dataset(config, 0, 1)))
  assert batch["image"].shape == (8, 32, 32, 3)
  assert batch["image"].std() > 0.1  # Photographs, not flat colour.
  held_out, train = sources.make_source(config, "eval"), sources.make_source(config, "train")
  for photo in ("rocket", "motorcycle", "camera"):  # Three whole photographs held out.
    assert photo in repr(held_out) and photo not in repr(train)
  crops = [held_out[i] for i in range(3)]  # One crop of each, in turn: RGB uint8, grey included.
  assert all(c.dtype == "uint8" and c.ndim == 3 and c.shape[2] == 3 for c in crops)
  grey = [bool((c[..., 0] == c[..., 2]).all()) for c in crops]
  assert grey == [False, False, True]  # The cameraman is grey; rocket and motorcycle are not.
  assert set(sources.SAMPLE_TRAIN_PHOTOS).isdisjoint(sources.SAMPLE_EVAL_PHOTOS)


def test_folder_source_is_compact_and_stable():
  paths = [f"/data/{i:07d}/ünïcode {i}.jpg" for i in range(1000)]
  src = sources.FolderSource(paths, "d")
  assert [src[i] for i in (0, 7, 999)] == [paths[0], paths[7], paths[999]]
  assert repr(src) == repr(sources.FolderSource(list(paths), "d"))
  assert repr(src) != repr(sources.FolderSource(paths[:-1], "d"))
  clone = pickle.loads(pickle.dumps(src))
  utf8_bytes = sum(len(p.encode()) for p in paths)
  assert clone[500] == paths[500] and len(pickle.dumps(src)) < utf8_bytes + 9 * len(paths) + 1000
  assert len(sources.FolderSource([], "e")) == 0 and src[-1] == paths[-1]


def test_tfds_source_under_mock_data():
  config = tiny_config(**{"data.source": "tfds", "data.tfds_name": "cifar10",
                          "data.train_split": "train[:75%]", "data.eval_split": "test",
                          "data.image_key": "picture"})  # Not a feature: its one image is used.
  with tfds.testing.mock_data(num_examples=24):
    train_src = sources.make_source(config, "train")
    # Image features come undecoded; the pipeline decodes them as it decodes a folder's files.
    assert "train[:75%]" in repr(train_src) and isinstance(train_src[0], bytes)
    assert transforms.decode_image(train_src[0]).shape == (32, 32, 3)
    batch = next(iter(pipeline.create_train_dataset(config, 0, 1)))
    eval_ds = pipeline.create_eval_dataset(config, 0, 1)
    eval_batch = next(pipeline.eval_batches(config, eval_ds, 1))
  assert batch["image"].shape == (8, 16, 16, 3) and eval_batch["image"].shape == (8, 16, 16, 3)
  assert int(batch["skipped"].sum()) == 0


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
  config = tiny_config(**{"data.source": "tfds", "data.tfds_name": "cifar10",
                          "data.tfds_data_dir": str(tmp_path)})
  with pytest.raises(DataError, match="not prepared.*tfds build cifar10"):
    sources.make_source(config, "train")


def test_tfds_name_may_be_data_dir_slash_name(tmp_path):
  assert sources.tfds_location("imagenet2012", "") == ("imagenet2012", "")
  assert sources.tfds_location("coco/2017:1.1.0", "/d") == ("coco/2017:1.1.0", "/d")
  assert sources.tfds_location("gs://b/tfds/laion_512/", "") == ("laion_512", "gs://b/tfds")
  assert sources.tfds_location(str(tmp_path / "x"), "") == ("x", str(tmp_path))
  with pytest.raises(ConfigError, match=r"is a path \(DATA_DIR/NAME\) and "
                     r"config.data.tfds_data_dir='/d' is set too"):
    sources.tfds_location("gs://b/tfds/laion_512", "/d")
  config = tiny_config(**{"data.source": "tfds", "data.tfds_name": str(tmp_path / "mine")})
  with pytest.raises(DataError, match=r"'mine' split 'train' is not prepared in "
                     rf"{tmp_path}.*python -m vae_scale.prepare"):
    sources.make_source(config, "train")
