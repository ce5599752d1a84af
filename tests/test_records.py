"""The record codec (`schemas.records`) against TensorFlow's own Example.

More codec cases (grey storage, channel and size checks) are in
tests/test_imaging.py, from when the codec lived in busi_core.imaging.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import schemas
from schemas import _example_pb2
from schemas import records
from tests import archive_factory as af

_INT_FEATURES = (schemas.FEATURE_CHANNELS, schemas.FEATURE_HEIGHT,
                 schemas.FEATURE_WIDTH, schemas.FEATURE_ORIGINAL_HEIGHT,
                 schemas.FEATURE_ORIGINAL_WIDTH)


def _record(pixels, label="benign", image_id="ab" * 32):
  return records.ImageRecord(
      image_id=image_id, source="gs://b/x.zip!/benign/é (1).png", label=label,
      pixels=pixels, original_height=2 ** 40, original_width=7)


@pytest.mark.parametrize("shape", [(9, 5), (9, 5, 1), (9, 5, 3)],
                         ids=["grey", "grey_1", "rgb"])
def test_format_2_round_trip(shape):
  pixels = af.speckle(np.random.default_rng(1), *shape)
  back = records.from_example(records.to_example(_record(pixels)))
  rgb = pixels if shape[-1] == 3 else np.repeat(
      pixels.reshape(9, 5, 1), 3, axis=2)
  assert back.pixels.shape == (9, 5, 3) and back.pixels.dtype == np.uint8
  np.testing.assert_array_equal(back.pixels, rgb)
  assert back._replace(pixels=None) == _record(None)


@pytest.mark.parametrize("channels", [1, 3])
def test_tensorflow_reads_our_bytes_as_we_do(channels):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  shape = (6, 4) if channels == 1 else (6, 4, 3)
  record = _record(af.speckle(np.random.default_rng(2), *shape), label="")
  ours = records.to_example(record)
  # TensorFlow's class, serialised deterministically, gives our very bytes.
  example = tf.train.Example.FromString(ours)
  assert example.SerializeToString(deterministic=True) == ours
  feature = example.features.feature
  assert feature[schemas.FEATURE_IMAGE].bytes_list.value == [
      record.pixels.tobytes()]
  assert [feature[k].int64_list.value[0] for k in _INT_FEATURES] == [
      channels, 6, 4, 2 ** 40, 7]
  parsed = tf.io.parse_example(tf.constant([ours, ours]),
                               schemas.feature_spec())
  assert [int(parsed[k][1]) for k in _INT_FEATURES] == [
      channels, 6, 4, 2 ** 40, 7]
  assert parsed[schemas.FEATURE_LABEL][0].numpy() == b""
  assert parsed[schemas.FEATURE_SOURCE][0].numpy() == record.source.encode()
  assert parsed[schemas.FEATURE_IMAGE_ID][0].numpy() == b"ab" * 32
  np.testing.assert_array_equal(
      tf.io.decode_raw(parsed[schemas.FEATURE_IMAGE][0], tf.uint8).numpy(),
      record.pixels.ravel())


def test_format_1_examples_written_by_tensorflow_decode():
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  pixels = af.speckle(np.random.default_rng(3), 5, 7, 3)

  def feature(value):
    if isinstance(value, bytes):
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

  # Format 1: no `channels`, RGB pixels; and no label at all, which reads "".
  serialized = tf.train.Example(features=tf.train.Features(feature={
      schemas.FEATURE_IMAGE: feature(pixels.tobytes()),
      schemas.FEATURE_IMAGE_ID: feature(b"c" * 64),
      schemas.FEATURE_SOURCE: feature("ü.png".encode()),
      schemas.FEATURE_HEIGHT: feature(5),
      schemas.FEATURE_WIDTH: feature(7),
      schemas.FEATURE_ORIGINAL_HEIGHT: feature(500),
      schemas.FEATURE_ORIGINAL_WIDTH: feature(700),
  })).SerializeToString()
  back = records.from_example(serialized)
  np.testing.assert_array_equal(back.pixels, pixels)
  assert (back.image_id, back.source, back.label) == ("c" * 64, "ü.png", "")
  assert (back.original_height, back.original_width) == (500, 700)


@pytest.mark.parametrize("flags", ["", "colour", "blank,low_contrast",
                                   "tiny,aspect_ratio,new_flag_2"])
def test_quality_flags_round_trip(flags):
  record = _record(af.speckle(np.random.default_rng(6), 3, 4))._replace(
      quality_flags=flags)
  serialized = records.to_example(record)
  assert records.from_example(serialized).quality_flags == flags
  example = _example_pb2.Example.FromString(serialized)
  assert example.features.feature[
      schemas.FEATURE_QUALITY_FLAGS].bytes_list.value == [flags.encode()]


def test_quality_flags_absent_read_as_none():
  record = _record(af.speckle(np.random.default_rng(7), 3, 4))
  assert record.quality_flags is None  # the default: existing callers
  serialized = records.to_example(record)
  # None writes no feature at all: the bytes of a record from before.
  example = _example_pb2.Example.FromString(serialized)
  assert schemas.FEATURE_QUALITY_FLAGS not in example.features.feature
  assert records.from_example(serialized).quality_flags is None
  # TensorFlow reads the absent feature as "", a set one as written.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  flagged = records.to_example(record._replace(quality_flags="colour"))
  parsed = tf.io.parse_example(tf.constant([serialized, flagged]),
                               schemas.feature_spec())
  assert list(parsed[schemas.FEATURE_QUALITY_FLAGS].numpy()) == [b"",
                                                                 b"colour"]


@pytest.mark.parametrize("flags", ["Colour", "colour,", ",blank", "a b",
                                   "colour;rm -rf", "x" * 65, "é"])
def test_quality_flags_that_are_not_names_are_refused(flags):
  record = _record(af.speckle(np.random.default_rng(8), 2, 2))
  with pytest.raises(ValueError, match="quality_flags"):
    records.to_example(record._replace(quality_flags=flags))
  # Nor read back from a record some other writer made.
  example = _example_pb2.Example.FromString(records.to_example(record))
  feature = example.features.feature[schemas.FEATURE_QUALITY_FLAGS]
  feature.bytes_list.value.append(flags.encode())
  with pytest.raises(ValueError, match="quality_flags"):
    records.from_example(example.SerializeToString())


def test_same_record_same_bytes():
  record = _record(af.speckle(np.random.default_rng(4), 8, 8))
  assert records.to_example(record) == records.to_example(record._replace(
      pixels=record.pixels.copy()))


@pytest.mark.parametrize("junk", [b"\xff\xff\xff", b"\x0a\x05abc"])
def test_bytes_that_are_no_example_are_a_value_error(junk):
  with pytest.raises(ValueError, match="not a tf.train.Example"):
    records.from_example(junk)


def test_bad_image_id_is_refused():
  record = _record(af.speckle(np.random.default_rng(5), 2, 2),
                   image_id="../../etc/passwd")
  with pytest.raises(ValueError, match="sha256"):
    records.from_example(records.to_example(record))


def test_messages_are_tensorflows_under_another_package():
  from google.protobuf import descriptor_pb2  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  for name in ("Example", "Features", "Feature", "BytesList", "FloatList",
               "Int64List"):
    ours, theirs = descriptor_pb2.DescriptorProto(), (
        descriptor_pb2.DescriptorProto())
    getattr(_example_pb2, name).DESCRIPTOR.CopyToProto(ours)
    getattr(tf.train, name).DESCRIPTOR.CopyToProto(theirs)
    assert str(ours).replace(".busi.tfexample.", ".tensorflow.") == str(
        theirs), name
  assert _example_pb2.Example.DESCRIPTOR.full_name == "busi.tfexample.Example"
  assert tf.train.Example.DESCRIPTOR.full_name == "tensorflow.Example"


_IMPORTS = {
    "tensorflow_first": "import tensorflow as tf\nfrom schemas import records",
    "records_first": "from schemas import records\n"
                     "assert 'tensorflow' not in sys.modules\n"
                     "import tensorflow as tf",
}


@pytest.mark.slow
@pytest.mark.parametrize("order", sorted(_IMPORTS))
def test_either_import_order_works(order):
  script = "\n".join([
      "import sys, numpy as np",
      _IMPORTS[order],
      "r = records.ImageRecord('d' * 64, 's', 'normal',",
      "                        np.zeros((2, 3), np.uint8), 2, 3)",
      "b = records.to_example(r)",
      "assert tf.train.Example.FromString(b).SerializeToString(",
      "    deterministic=True) == b",
      "assert records.from_example(b).pixels.shape == (2, 3, 3)",
  ])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-c", script], cwd=root,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
