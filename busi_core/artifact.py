"""The model artifact directory: writing it, validating it, loading it.

MODEL_DIR/
  model.keras    raw uint8 RGB [batch, H, W, 3] → probabilities in labels order
  labels.json    JSON list of class names, the output order
  MODEL_CARD.md  intended use, data, metrics, calibration, caveats (from the
                 metadata; training/model_card.py)
  metadata.json  schemas.metadata.ArtifactMetadata (required fields:
                 schemas.METADATA_REQUIRED_FIELDS)
  ood.npz        the out-of-distribution detector (busi_core.ood), when
                 metadata.json has an "ood" block; older artifacts have none

`read_artifact_info` validates the small JSON files without loading the model
or even importing TensorFlow (for the launcher's up-front checks) and returns
the metadata as the typed record;
`load_artifact` also loads the model, in Keras safe mode, and the OOD
detector, and checks both against the metadata. Both go through Beam
FileSystems, so MODEL_DIR may be gs://.
"""

import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from typing import TYPE_CHECKING, Any, Iterator, List, NamedTuple, Optional

from apache_beam.io.filesystems import FileSystems

import schemas
from busi_core import ood as ood_lib
from schemas.metadata import ArtifactMetadata, MetadataError

if TYPE_CHECKING:  # Keras is imported only by the functions that load/save.
  import keras

_RETRAIN = ("Retrain with this version (`python -m training train`), or use the"
            " scoring release that wrote it.")
_PASS_DIR = "Pass the directory written by `python -m training train`."

DEFAULT_NAME = "busi"


class ArtifactError(ValueError):
  """The artifact is missing, malformed or unsafe; the message says the fix."""


class ArtifactInfo(NamedTuple):
  labels: List[str]
  metadata: ArtifactMetadata


class Artifact(NamedTuple):
  model: "keras.Model"
  labels: List[str]
  metadata: ArtifactMetadata
  local_dir: str  # the directory model.keras was read from (model_dir itself)
  model_sha256: str  # of the model.keras loaded
  ood: Optional[ood_lib.OodModel] = None  # None: the artifact has none


def _join(model_dir: str, name: str) -> str:
  return FileSystems.join(model_dir.rstrip("/"), name)


def _read_json(model_dir: str, name: str) -> Any:
  uri = _join(model_dir, name)
  if not FileSystems.exists(uri):
    raise ArtifactError(f"{model_dir} has no {name}. {_PASS_DIR}")
  try:
    with FileSystems.open(uri) as f:
      return json.loads(f.read().decode("utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise ArtifactError(f"{uri} is not valid JSON ({e}). {_PASS_DIR}") from e


def read_artifact_info(model_dir: str) -> ArtifactInfo:
  """Validates labels.json and metadata.json without loading the model.

  Args:
    model_dir: the artifact directory (local or gs://).

  Returns:
    The labels (output order) and the metadata as its typed record, checked
    once here: required fields, every field's type, the ranges scoring
    relies on.

  Raises:
    ArtifactError: a file or field is missing or wrong; the message names it
      and says what to do.
  """
  if not FileSystems.exists(_join(model_dir, schemas.MODEL_FILE)):
    raise ArtifactError(f"{model_dir} has no {schemas.MODEL_FILE}. {_PASS_DIR}")
  labels = _read_json(model_dir, schemas.LABELS_FILE)
  if (not isinstance(labels, list) or not labels or
      not all(isinstance(x, str) and x for x in labels) or
      len(set(labels)) != len(labels)):
    raise ArtifactError(
        f"{schemas.LABELS_FILE} in {model_dir} must be a JSON list of distinct"
        f" class names, got {labels!r}. {_PASS_DIR}")
  raw = _read_json(model_dir, schemas.METADATA_FILE)
  if not isinstance(raw, dict):
    raise ArtifactError(f"{schemas.METADATA_FILE} in {model_dir} is not a JSON"
                        f" object. {_PASS_DIR}")
  missing = [f for f in schemas.METADATA_REQUIRED_FIELDS if f not in raw]
  if missing:
    raise ArtifactError(
        f"{schemas.METADATA_FILE} in {model_dir} lacks {', '.join(missing)}:"
        f" it was not written by this version's training. {_RETRAIN}")
  # Before the types: another format may have another shape altogether.
  if str(raw["format_version"]) != schemas.ARTIFACT_FORMAT_VERSION:
    raise ArtifactError(
        f"{model_dir} has artifact format {raw['format_version']!r};"
        f" this release reads format {schemas.ARTIFACT_FORMAT_VERSION!r}."
        f" {_RETRAIN}")
  try:
    metadata = ArtifactMetadata.from_json(raw)
  except MetadataError as e:
    raise ArtifactError(f"{schemas.METADATA_FILE} in {model_dir}: {e}."
                        f" {_PASS_DIR}") from e
  _check_values(model_dir, labels, metadata)
  return ArtifactInfo(labels, metadata)


def _check_values(model_dir: str, labels: List[str],
                  metadata: ArtifactMetadata) -> None:
  """The ranges scoring relies on, and labels.json against the metadata."""
  if list(metadata.labels) != labels:
    raise ArtifactError(
        f"{schemas.LABELS_FILE} {labels} and metadata labels"
        f" {list(metadata.labels)} differ in {model_dir}: the files come from"
        f" different trainings. {_PASS_DIR}")
  if not 0.0 <= metadata.threshold <= 1.0:
    raise ArtifactError(
        f"metadata threshold {metadata.threshold!r} in {model_dir} is not a"
        " number in [0, 1]; fix metadata.json or retrain with --threshold.")
  if not 0.0 < metadata.temperature < float("inf"):
    raise ArtifactError(
        f"metadata temperature {metadata.temperature!r} in {model_dir} is not"
        f" a positive number. {_PASS_DIR}")
  if metadata.image_size < 1:
    raise ArtifactError(
        f"metadata image_size {metadata.image_size!r} in {model_dir} is not a"
        f" positive integer. {_PASS_DIR}")
  if metadata.ood is not None:
    block = metadata.ood
    missing = [name for name in ("transform", "dims", "file", "sha256",
                                 "threshold") if getattr(block, name) is None]
    if missing:
      raise ArtifactError(
          f"metadata ood block in {model_dir} lacks {', '.join(missing)}."
          f" {_PASS_DIR}")
    if block.file != schemas.OOD_FILE:
      raise ArtifactError(
          f"metadata ood file {block.file!r} in {model_dir} is not"
          f" {schemas.OOD_FILE}. {_PASS_DIR}")


def load_ood(model_dir: str,
             metadata: ArtifactMetadata) -> Optional[ood_lib.OodModel]:
  """The artifact's out-of-distribution detector, checked against its
  metadata block; None when the artifact has none.

  Raises:
    ArtifactError: the block names a file that is missing, replaced or
      malformed.
  """
  block = metadata.ood
  if block is None:
    return None
  path = _join(model_dir, schemas.OOD_FILE)
  try:
    with FileSystems.open(path) as f:
      data = f.read()
  except Exception as e:  # Beam raises IOError / BeamIOError / ...
    raise ArtifactError(
        f"cannot read {path}, which metadata.json's ood block names:"
        f" {type(e).__name__}: {e}. {_PASS_DIR}") from e
  try:
    return ood_lib.from_bytes(data, transform=block.transform,
                              threshold=block.threshold, dims=block.dims,
                              sha256=block.sha256)
  except ood_lib.OodError as e:
    raise ArtifactError(f"{model_dir}: {e}. {_PASS_DIR}") from e


def _layer_classes(config: Any) -> Iterator[str]:
  """Every class_name in a (nested) Keras config."""
  if isinstance(config, dict):
    if "class_name" in config:
      yield config["class_name"]
    for value in config.values():
      yield from _layer_classes(value)
  elif isinstance(config, list):
    for value in config:
      yield from _layer_classes(value)


def _refuse_lambda(path: str) -> None:
  # Checked in the config itself too, so that a process which called
  # keras.config.enable_unsafe_deserialization() still refuses.
  try:
    with zipfile.ZipFile(path) as zf:
      config = json.loads(zf.read("config.json"))
  except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise ArtifactError(f"{path} is not a Keras .keras file ({e}). {_PASS_DIR}"
                       ) from e
  if "Lambda" in set(_layer_classes(config)):
    raise ArtifactError(
        f"{path} contains a Lambda layer, which can run arbitrary code and is"
        " refused in Keras safe mode. Rebuild the model with the registered"
        " layers of busi_core.layers (`python -m training train`).")


def _localize(model_dir: str) -> str:
  """A local directory holding the artifact's files (copied if remote)."""
  if "://" not in model_dir:
    return model_dir
  local = tempfile.mkdtemp(prefix="busi-model-")
  for name in (schemas.MODEL_FILE, schemas.LABELS_FILE, schemas.METADATA_FILE):
    with FileSystems.open(_join(model_dir, name)) as src, open(
        os.path.join(local, name), "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
  return local


def load_artifact(model_dir: str,
                  expected_sha256: Optional[str] = None) -> Artifact:
  """Validates and loads an artifact (safe mode, not compiled).

  model.keras must have the sha256 that metadata.json records (or, for
  artifacts saved before `model_sha256` existed, the digest prefix ending
  `model_version`): a model file copied over another artifact's is refused,
  so predictions never carry the wrong model_version by accident. This
  guards against mistakes, not tampering: whoever can replace model.keras
  can rewrite metadata.json too.

  Args:
    model_dir: the artifact directory (local or gs://; remote files are copied
      to a local temporary directory first).
    expected_sha256: also require this digest: a worker passes the one its
      job was launched with, so an artifact replaced mid-job is refused
      instead of scoring under the launch-time model_version.

  Returns:
    The model, labels, metadata and the local directory used.

  Raises:
    ArtifactError: invalid files, a model Keras cannot load safely, a model
      file that is not the one the metadata (or expected_sha256) names, or a
      model whose input or output shape disagrees with the metadata.
  """
  labels, metadata = read_artifact_info(model_dir)
  local_dir = _localize(model_dir)
  try:
    model, digest = _load_checked(model_dir, local_dir, labels, metadata,
                                  expected_sha256)
  finally:
    # A remote artifact's temporary copy is not needed once the model is in
    # memory; workers load models repeatedly over a long job.
    if local_dir != model_dir:
      shutil.rmtree(local_dir, ignore_errors=True)
  detector = load_ood(model_dir, metadata)
  if detector is not None:
    _check_ood_dims(model_dir, model, detector)
  return Artifact(model, labels, metadata, model_dir if local_dir != model_dir
                  else local_dir, digest, detector)


def _check_ood_dims(model_dir: str, model: "keras.Model",
                    detector: ood_lib.OodModel) -> None:
  try:
    layer = model.get_layer(schemas.FEATURES_LAYER)
  except ValueError as e:
    raise ArtifactError(
        f"{model_dir} has an OOD detector but its model has no"
        f" {schemas.FEATURES_LAYER!r} layer. {_PASS_DIR}") from e
  dims = int(layer.output.shape[-1])
  if dims != detector.dims:
    raise ArtifactError(
        f"{model_dir}: the OOD detector takes {detector.dims} features, the"
        f" model's {schemas.FEATURES_LAYER!r} layer gives {dims}. {_PASS_DIR}")


def _check_digest(model_dir: str, digest: str, metadata: ArtifactMetadata,
                  expected_sha256: Optional[str]) -> None:
  """Refuses a model.keras that is not the one the metadata names."""
  recorded = metadata.model_sha256
  if recorded is not None:
    matches = digest == recorded
  else:  # saved before model_sha256 existed: model_version's digest prefix
    legacy = _VERSION_DIGEST.search(metadata.model_version)
    matches = legacy is None or digest.startswith(legacy.group(1))
  if not matches:
    raise ArtifactError(
        f"{model_dir}/{schemas.MODEL_FILE} is not the model its metadata.json"
        f" describes (sha256 {digest[:16]}... differs from the one recorded"
        f" for {metadata.model_version}): the file was replaced after"
        f" training. {_PASS_DIR}")
  if expected_sha256 is not None and digest != expected_sha256:
    raise ArtifactError(
        f"{model_dir} changed after this job started: model.keras now has"
        f" sha256 {digest[:16]}..., the job was launched with"
        f" {expected_sha256[:16]}.... Rerun the job to score with the new"
        " model.")


def _load_checked(model_dir: str, local_dir: str, labels: List[str],
                  metadata: ArtifactMetadata, expected_sha256: Optional[str] = None):
  """Loads model.keras from local_dir in safe mode and checks its digest and
  shapes; returns (model, sha256 of model.keras)."""
  path = os.path.join(local_dir, schemas.MODEL_FILE)
  _refuse_lambda(path)
  digest = sha256_file(path)
  _check_digest(model_dir, digest, metadata, expected_sha256)
  import keras  # pylint: disable=import-outside-toplevel,redefined-outer-name
  # Registers VGGPreprocess and TemperatureScaling with Keras.
  import busi_core.layers  # pylint: disable=import-outside-toplevel,unused-import
  try:
    model = keras.saving.load_model(path, safe_mode=True, compile=False)
  except Exception as e:  # Keras raises ValueError, TypeError, KeyError, ...
    if "safe_mode" in str(e):
      raise ArtifactError(
          f"{model_dir}/{schemas.MODEL_FILE} needs unsafe deserialization"
          f" (refused in Keras safe mode): {e}") from e
    raise ArtifactError(
        f"cannot load {model_dir}/{schemas.MODEL_FILE}: {type(e).__name__}:"
        f" {e}. {_RETRAIN}") from e
  size = metadata.image_size
  expected_input = (None, size, size, 3)
  actual_input = (tuple(model.inputs[0].shape) if len(model.inputs) == 1
                  else None)
  if actual_input != expected_input:
    raise ArtifactError(
        f"model input shape {actual_input} does not match metadata image_size"
        f" {size} (expected {expected_input}) in {model_dir}. {_PASS_DIR}")
  if model.inputs[0].dtype != "uint8":
    raise ArtifactError(
        f"model input dtype is {model.inputs[0].dtype}; artifacts take raw"
        f" uint8 pixels. {_RETRAIN}")
  outputs = [tuple(o.shape) for o in model.outputs]
  if outputs != [(None, len(labels))]:
    raise ArtifactError(
        f"model outputs {outputs} do not match the {len(labels)} labels"
        f" {labels} in {model_dir}. {_PASS_DIR}")
  return model, digest


# The digest prefix that model_version ends with (see model_version).
_VERSION_DIGEST = re.compile(r"-\d{8}T\d{6}Z-([0-9a-f]{8})$")


def model_version(name: str, created: datetime.datetime,
                  model_bytes_sha256: str) -> str:
  """`NAME-YYYYmmddTHHMMSSZ-HASH8`: sortable, and unique per saved model."""
  return f"{name}-{created:%Y%m%dT%H%M%SZ}-{model_bytes_sha256[:8]}"


def training_warning_lines(model_version: Any, warnings: Any) -> List[str]:
  """Each training warning of an artifact (its metadata's `warnings`, or a
  run manifest's MANIFEST_MODEL_WARNINGS) as the sentence scoring, its
  summary, report and compare, doctor, evaluate and recalibrate say ("the
  training of its weights": a recalibrated artifact's are its parent's);
  nothing for a value that is not a list (null: the artifact predates
  train's checks), and nothing for an item that is not a string (a
  hand-edited manifest)."""
  return _carried(model_version, "the training of its weights", warnings)


def recalibration_warning_lines(model_version: Any,
                                warnings: Any) -> List[str]:
  """Each warning `recalibrate` found on the site sample of an artifact
  (its metadata's `recalibration` → `warnings`, or a run manifest's
  MANIFEST_MODEL_RECALIBRATION_WARNINGS), as `training_warning_lines`
  words the training ones."""
  return _carried(model_version, "its recalibration, on the site sample",
                  warnings)


def _carried(model_version: Any, source: str, warnings: Any) -> List[str]:
  if not isinstance(warnings, (list, tuple)):
    return []
  model = (f"The model {model_version}" if isinstance(model_version, str)
           and model_version else "The model")
  return [f"{model} carries a warning from {source}: {warning}"
          for warning in warnings if isinstance(warning, str)]


def _warning_lines(model_version: Any, training: Any,
                   recalibration: Any) -> List[str]:
  """Every warning a model carries: its training's
  (`training_warning_lines`), then its recalibration's
  (`recalibration_warning_lines`)."""
  return (training_warning_lines(model_version, training)
          + recalibration_warning_lines(model_version, recalibration))


def model_warning_lines(metadata: ArtifactMetadata) -> List[str]:
  """Every warning an artifact carries, as scoring, doctor and evaluate
  repeat them (`_warning_lines`)."""
  return _warning_lines(metadata.model_version, metadata.warnings,
                        metadata.recalibration_warnings)


def run_warning_lines(manifest: Optional[dict]) -> List[str]:
  """`model_warning_lines` of a scoring run's manifest (its model's
  version, MANIFEST_MODEL_WARNINGS and
  MANIFEST_MODEL_RECALIBRATION_WARNINGS); nothing without a manifest."""
  manifest = manifest or {}
  return _warning_lines(
      manifest.get(schemas.MANIFEST_MODEL_VERSION),
      manifest.get(schemas.MANIFEST_MODEL_WARNINGS),
      manifest.get(schemas.MANIFEST_MODEL_RECALIBRATION_WARNINGS))


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
