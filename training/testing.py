"""Test helpers for this package and for scoring's tests: tiny artifacts and
TFRecords written exactly as the preprocessing stage writes them."""

import hashlib
from typing import Iterable, List, Optional, Sequence

import numpy as np

import schemas
from busi_core import tfrecord_io
from schemas import metadata as metadata_schema
from schemas import records as records_lib


def write_tfrecords(path: str,
                    records: Iterable[records_lib.ImageRecord]) -> str:
  """Writes records as one gzip TFRecord file, as the pipeline does.

  Args:
    path: the file to write, e.g. ".../part-00000-of-00001.tfrecord.gz".
    records: the images.

  Returns:
    `path`.
  """
  return tfrecord_io.write_file(
      path, (records_lib.to_example(record) for record in records))


def make_record(pixels: np.ndarray, label: str,
                source: Optional[str] = None) -> records_lib.ImageRecord:
  """An ImageRecord whose image_id is the sha256 of the pixels (stands in for
  the sha256 of the original file's bytes)."""
  pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
  image_id = hashlib.sha256(pixels.tobytes()).hexdigest()
  folder = label or "unlabelled"
  return records_lib.ImageRecord(
      image_id=image_id,
      source=source or f"test.zip!/{folder}/{image_id[:12]}.png",
      label=label, pixels=pixels, original_height=pixels.shape[0],
      original_width=pixels.shape[1])


def class_images(label_index: int, count: int, image_size: int,
                 rng: np.random.Generator) -> np.ndarray:
  """uint8 [count, size, size, 3] images a small model separates easily.

  Speckle plus a class-dependent bright square in a class-dependent corner,
  so that a few epochs of the tiny backbone learn something.
  """
  images = rng.integers(0, 90, size=(count, image_size, image_size, 3),
                        dtype=np.int64)
  half = image_size // 2
  rows = slice(0, half) if label_index % 2 == 0 else slice(half, None)
  cols = slice(0, half) if label_index < 2 else slice(half, None)
  images[:, rows, cols, :] += 60 * (label_index + 1)
  return np.clip(images, 0, 255).astype(np.uint8)


def every_class_images(per_class: int, image_size: int,
                       seed: int = 0) -> np.ndarray:
  """`class_images` of each class in label order, `per_class` each."""
  rng = np.random.default_rng(seed)
  return np.concatenate([class_images(index, per_class, image_size, rng)
                         for index in range(len(schemas.LABELS))])


def synthetic_records(per_class: int, image_size: int, seed: int = 0,
                      labels: Sequence[str] = schemas.LABELS
                     ) -> List[records_lib.ImageRecord]:
  """`per_class` distinct labelled records of each class (see class_images)."""
  rng = np.random.default_rng(seed)
  records = []
  for index, label in enumerate(labels):
    for pixels in class_images(index, per_class, image_size, rng):
      records.append(make_record(pixels, label))
  return records


def make_test_artifact(model_dir: str, image_size: int = 32,
                       backbone: str = "tiny", threshold: float = 0.9,
                       seed: int = 0, ood_images: Optional[np.ndarray] = None,
                       ood_pass_rate: float = schemas.DEFAULT_OOD_PASS_RATE,
                       ood_transform: str = schemas.OOD_TRANSFORM_SQRT_L2,
                       network_size: Optional[int] = None
                      ) -> metadata_schema.ArtifactMetadata:
  """Builds and saves an untrained but valid artifact, in about a second.

  The model has the real structure (uint8 input, VGGPreprocess, a conv base
  whose last conv is "block5_conv3", GAP, head, TemperatureScaling, Softmax),
  random weights from `seed`, metadata with every required field, and a
  MODEL_CARD.md that says it is an untrained test artifact.
  Calls `keras.utils.set_random_seed(seed)`.

  Args:
    model_dir: local directory to write.
    image_size: model input size.
    backbone: "tiny" (fast) or "vgg16" (random weights).
    threshold: metadata threshold.
    seed: weight initialisation seed.
    ood_images: uint8 [N, size, size, 3] in-distribution images: when given,
      the artifact gets an OOD detector fitted (as training fits one) on the
      untrained model's features of the first 80 % of them, its threshold
      chosen on the rest for `ood_pass_rate`.
    ood_pass_rate, ood_transform: as `train`'s flags.
    network_size: the backbone's input size (the model resizes to it);
      None: image_size.

  Returns:
    The metadata written.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from training import metrics, model as model_lib, saving, split  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(seed)
  labels = list(schemas.LABELS)
  model = model_lib.build_model(image_size, model_lib.NO_WEIGHTS, len(labels),
                                backbone, network_size)
  empty = {name: [] for name in split.SPLITS}
  ood_block = None
  if ood_images is not None:
    ood_block = _fit_test_detector(model, model_dir, ood_images,
                                   ood_pass_rate, ood_transform)
  return saving.save_artifact(
      model, model_dir, labels,
      name=f"test-{backbone}",
      image_size=image_size,
      threshold=threshold,
      backbone=backbone,
      weights_source=model_lib.NO_WEIGHTS,
      data_fingerprint=split.data_fingerprint(empty),
      class_counts={name: {label: 0 for label in labels}
                    for name in split.SPLITS},
      test_metrics=metadata_schema.ClassificationReport.from_json(
          metrics.classification_report([], [], labels)),
      temperature=1.0,
      threshold_source=schemas.THRESHOLD_FIXED,
      target_accuracy=None,
      calibration=metadata_schema.Calibration(
          temperature=1.0, fitted=False, reason="untrained test artifact",
          split=split.TEST, bins=15, count=0, ece_before=None,
          ece_after=None),
      training=metadata_schema.TrainingSettings(untrained_test_artifact=True,
                                                seed=seed),
      ood=ood_block)


def _fit_test_detector(model, model_dir: str, images: np.ndarray,
                       pass_rate: float, transform: str
                      ) -> metadata_schema.OodDetector:
  """Fits (as `train` does) and writes make_test_artifact's detector;
  returns its block."""
  import os  # pylint: disable=import-outside-toplevel
  from training import model as model_lib, ood_detector  # pylint: disable=import-outside-toplevel
  features = model_lib.in_batches(
      model_lib.sub_model(model, None, schemas.FEATURES_LAYER),
      np.asarray(images, np.uint8), 32)
  cut = max(2, int(round(0.8 * len(features))))
  detector = ood_detector.build(features[:cut], features[cut:],
                                features[:0], np.arange(cut), transform,
                                pass_rate)
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, schemas.OOD_FILE), "wb") as f:
    f.write(detector.data)
  return detector.block
