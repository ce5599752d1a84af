"""training.data reads TFRecords through busi_core.tfrecord_io: the records
tf.data read, in the same order, and a damaged file is refused."""

import numpy as np
import pytest

from busi_core import tfrecord_io
from schemas import records as records_lib
from training import data as data_lib
from training import testing


@pytest.fixture(name="files")
def _files(tmp_path):
  records = testing.synthetic_records(per_class=3, image_size=8, seed=2)
  grey = testing.make_record(records[0].pixels[..., 0], "benign",
                             source="test.zip!/benign/grey.png")
  return [
      testing.write_tfrecords(str(tmp_path / "b.tfrecord.gz"),
                              records[5:] + records[1:2]),
      testing.write_tfrecords(str(tmp_path / "a.tfrecord.gz"),
                              records[:5] + [grey]),
  ]


def test_same_records_in_the_same_order_as_tf_data(files):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
  expected = [records_lib.from_example(s)
              for s in dataset.as_numpy_iterator()]
  got = list(data_lib.read_records(files))
  assert [r.source for r in got] == [r.source for r in expected]
  assert len(got) == 11
  for ours, theirs in zip(got, expected):
    np.testing.assert_array_equal(ours.pixels, theirs.pixels)
    assert ours._replace(pixels=None) == theirs._replace(pixels=None)


def test_load_labelled_sorts_by_id_and_drops_duplicates(files, tmp_path):
  data, stats = data_lib.load_labelled([str(tmp_path / "*.tfrecord.gz")])
  assert data.image_ids == sorted(data.image_ids)
  assert data.images.shape == (10, 8, 8, 3)
  assert (stats.examples, stats.duplicates, stats.used) == (11, 1, 10)
  del files


def test_a_damaged_file_is_refused_by_name(files):
  with open(files[1], "rb") as f:
    data = f.read()
  assert all(isinstance(i, tfrecord_io.Record)
             for i in tfrecord_io.read_file(files[1]))
  with open(files[1], "wb") as f:
    f.write(data[:len(data) // 2])  # cut short
  with pytest.raises(ValueError, match="a.tfrecord.gz.*BadTFRecordFile"):
    list(data_lib.read_records(files))


def test_a_size_mismatch_names_what_asked_for_the_size(files, tmp_path):
  """--image_size (train, cv) or the model's own size (evaluate,
  recalibrate), each with what to run."""
  pattern = [str(tmp_path / "*.tfrecord.gz")]
  with pytest.raises(ValueError) as flag:
    data_lib.load_labelled(pattern, image_size=16)
  assert str(flag.value) == (
      "--image_size 16 but the TFRecords hold 8x8 images; rerun `python -m"
      " beam_pipeline preprocess --image_size 16` or leave --image_size out")
  with pytest.raises(ValueError) as model:
    data_lib.load_labelled(pattern, image_size=16, model_size=True)
  assert str(model.value) == (
      "the model takes 16x16 images but the TFRecords hold 8x8; preprocess"
      " the images again with `python -m beam_pipeline preprocess"
      " --image_size 16`")
  del files


def test_unlabelled_records_say_where_a_label_comes_from(tmp_path):
  # evaluate and recalibrate read labels too: the message names no command.
  pixels = np.zeros((8, 8, 3), np.uint8)
  path = testing.write_tfrecords(str(tmp_path / "u.tfrecord.gz"),
                                 [testing.make_record(pixels, "")])
  with pytest.raises(ValueError) as raised:
    data_lib.load_labelled([path])
  assert str(raised.value) == (
      f"no labelled image in ['{path}'] (1 examples, 1 unlabelled). An"
      " image's label is the folder it sits in: put the images under folders"
      " named after a class (normal, benign, malignant) and preprocess them"
      " again.")
