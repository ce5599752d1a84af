"""TFRecord feature spec, label set and output layout shared by every stage."""

from typing import Dict

# Bumped whenever the TFRecord features, the Parquet columns or the output
# layout change in a way older readers cannot handle.
FORMAT_VERSION = "2"  # 2: one-channel grey images (FEATURE_CHANNELS)

# Class names in the order of the model's outputs for the standard model.
MALIGNANT = "malignant"  # the class a missed case costs most
BENIGN = "benign"  # a lesion too: what malignant must be told apart from
LABELS = ("normal", BENIGN, MALIGNANT)

DEFAULT_IMAGE_SIZE = 224

# tf.train.Example feature keys.
FEATURE_IMAGE = "image"  # raw uint8 pixels, row-major [height, width, channels]
# 1: grey, replicated to RGB on reading; 3: RGB. Absent (format 1) means 3.
FEATURE_CHANNELS = "channels"
FEATURE_IMAGE_ID = "image_id"  # sha256 hex of the archive member's bytes
FEATURE_SOURCE = "source"  # archive URI + "!/" + member path, or the file URI
FEATURE_LABEL = "label"  # one of LABELS, or "" when the path names no class
FEATURE_HEIGHT = "height"  # stored (resized) height
FEATURE_WIDTH = "width"  # stored (resized) width
FEATURE_ORIGINAL_HEIGHT = "original_height"
FEATURE_ORIGINAL_WIDTH = "original_width"
# Names of the image-quality flags that fired (schemas.quality), joined by
# QUALITY_FLAG_SEPARATOR; "" when none did. Absent in records written before
# the checks existed: older readers ignore it, so FORMAT_VERSION stands.
FEATURE_QUALITY_FLAGS = "quality_flags"
# DICOM only, each absent for other images (older readers ignore them, so
# FORMAT_VERSION stands):
# 1-based number of the frame of a multi-frame DICOM (DICOM's own numbering,
# as in Referenced Frame Number); absent for single-frame images.
FEATURE_FRAME = "frame"
# HMAC-SHA256 (hex) of StudyInstanceUID / SeriesInstanceUID under the run's
# key (busi_core.pseudonyms); absent without a key or without the UID.
FEATURE_STUDY_KEY = "study_key"
FEATURE_SERIES_KEY = "series_key"
# 1 when the image was cropped to its ultrasound region's B-mode area before
# resizing, 0 when a DICOM had no such region.
FEATURE_REGION_CROPPED = "region_cropped"

# Output layout under a run's output directory.
TFRECORD_DIR = "tfrecords"
TFRECORD_SUFFIX = ".tfrecord.gz"
ERRORS_DIR = "errors"
PREDICTIONS_DIR = "predictions"
GRADCAM_DIR = "gradcam"
MANIFEST_FILE = "manifest.json"  # its fields: schemas.manifest
# Held by the run writing the directory, from before it deletes or writes
# anything there until its manifest is written (beam_pipeline.output_lock).
RUN_LOCK_FILE = ".busi-run.lock"


def feature_spec() -> Dict[str, object]:
  """Returns the `tf.io.parse_example` spec for the TFRecords.

  TensorFlow is imported here, not at module level, so that modules which only
  need the names stay light.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  return {
      FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
      FEATURE_CHANNELS: tf.io.FixedLenFeature([], tf.int64, default_value=3),
      FEATURE_IMAGE_ID: tf.io.FixedLenFeature([], tf.string),
      FEATURE_SOURCE: tf.io.FixedLenFeature([], tf.string),
      FEATURE_LABEL: tf.io.FixedLenFeature([], tf.string, default_value=""),
      FEATURE_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
      FEATURE_WIDTH: tf.io.FixedLenFeature([], tf.int64),
      FEATURE_ORIGINAL_HEIGHT: tf.io.FixedLenFeature([], tf.int64),
      FEATURE_ORIGINAL_WIDTH: tf.io.FixedLenFeature([], tf.int64),
      FEATURE_QUALITY_FLAGS: tf.io.FixedLenFeature([], tf.string,
                                                   default_value=""),
      # -1 / "": absent (not a multi-frame DICOM, no key, not a DICOM).
      FEATURE_FRAME: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
      FEATURE_STUDY_KEY: tf.io.FixedLenFeature([], tf.string,
                                               default_value=""),
      FEATURE_SERIES_KEY: tf.io.FixedLenFeature([], tf.string,
                                                default_value=""),
      FEATURE_REGION_CROPPED: tf.io.FixedLenFeature([], tf.int64,
                                                    default_value=-1),
  }

# The project's release; setup.py reads it from here.
PACKAGE_VERSION = "0.1.0"
