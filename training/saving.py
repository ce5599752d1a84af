"""Writing a model artifact: model.keras, labels.json, the model card and
metadata.json (last), and copying a finished one to gs://.

Reading and checking an artifact is `busi_core.artifact`, which scoring uses
too; only training writes one.
"""

import datetime
import json
import os
import shutil
from typing import TYPE_CHECKING, Any, Dict, List, Sequence

from apache_beam.io.filesystems import FileSystems

import schemas
from busi_core import artifact
from schemas.metadata import ArtifactMetadata, MetadataError
from training import model as model_lib
from training import model_card

if TYPE_CHECKING:
  import keras


def save_artifact(model: "keras.Model", model_dir: str, labels: Sequence[str],
                  /, **fields: Any) -> ArtifactMetadata:
  """Writes model.keras, labels.json, MODEL_CARD.md and metadata.json into a
  local directory.

  metadata.json is written last, so a directory with one is complete. The
  card is rendered from the final metadata (`training.model_card.render`).

  Args:
    model: the uint8-input classifier, outputs in `labels` order.
    model_dir: local directory (created if needed).
    labels: class names in output order.
    **fields: `ArtifactMetadata` fields (records or their JSON). The
      stamped ones (schemas.metadata.STAMPED_FIELDS), image_size (from the
      model) and threshold (DEFAULT_THRESHOLD) are filled in when absent;
      labels (the argument) and model_sha256 always; temperature is always
      the model's (a different value given is an error). A `name`, if
      given, prefixes model_version.

  Returns:
    The metadata written.

  Raises:
    ArtifactError: a required field is still missing, a field has the wrong
      type, or the result does not pass `read_artifact_info`.
  """
  labels = list(labels)
  os.makedirs(model_dir, exist_ok=True)
  metadata_path = os.path.join(model_dir, schemas.METADATA_FILE)
  if os.path.exists(metadata_path):
    os.remove(metadata_path)  # an interrupted save must not look complete
  model_path = os.path.join(model_dir, schemas.MODEL_FILE)
  model.save(model_path)
  with open(os.path.join(model_dir, schemas.LABELS_FILE), "w",
            encoding="utf-8") as f:
    json.dump(labels, f)

  metadata = _stamp(model, model_path, labels, fields)
  model_card.write(metadata, os.path.join(model_dir, schemas.MODEL_CARD_FILE))
  tmp = metadata_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(metadata.to_json(), f, indent=2)
  os.replace(tmp, metadata_path)
  artifact.read_artifact_info(model_dir)
  return metadata


def _stamp(model: "keras.Model", model_path: str, labels: List[str],
           fields: Dict[str, Any]) -> ArtifactMetadata:
  """The metadata of the model just saved: `fields` with the stamped ones
  filled in, every type checked."""
  created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
  model_sha256 = artifact.sha256_file(model_path)
  name = fields.get("name") or artifact.DEFAULT_NAME
  temperature = model_lib.temperature_of(model)
  given = fields.get("temperature", temperature)
  if abs(float(given) - temperature) > 1e-6:
    raise artifact.ArtifactError(
        f"metadata temperature {given} differs from the model's"
        f" TemperatureScaling value {temperature}")
  draft = dict(
      model_version=artifact.model_version(name, created, model_sha256),
      created_at=created.isoformat(),
      image_size=int(model.inputs[0].shape[1]),
      network_size=model_lib.network_size(model),
      threshold=schemas.DEFAULT_THRESHOLD,
      format_version=schemas.ARTIFACT_FORMAT_VERSION,
      package_version=schemas.PACKAGE_VERSION)
  draft.update(fields)
  draft.update(temperature=temperature, labels=tuple(labels),
               model_sha256=model_sha256)
  missing = [f for f in schemas.METADATA_REQUIRED_FIELDS if f not in draft]
  if missing:
    raise artifact.ArtifactError(f"metadata_fields lacks {', '.join(missing)}")
  try:
    # Through JSON: checks every type, and blocks given as dicts become
    # records.
    return ArtifactMetadata.from_json(ArtifactMetadata(**draft).to_json())
  except MetadataError as e:
    raise artifact.ArtifactError(f"metadata: {e}") from e


def copy_artifact(local_dir: str, output: str) -> None:
  """Copies a finished local artifact directory to `output` (e.g. gs://).

  metadata.json is copied last, so the copy counts as an artifact only once
  every other file is there.

  Args:
    local_dir: a directory written by `save_artifact` (and its companions).
    output: the destination directory, any Beam FileSystems path.
  """
  names = sorted(os.listdir(local_dir),
                 key=lambda n: n == schemas.METADATA_FILE)
  # An older artifact's metadata.json must not sit beside the new model while
  # the files are copied (or if the copy fails): it goes first, comes last.
  old_metadata = FileSystems.join(output.rstrip("/"), schemas.METADATA_FILE)
  if FileSystems.exists(old_metadata):
    FileSystems.delete([old_metadata])
  for name in names:
    with open(os.path.join(local_dir, name), "rb") as src, FileSystems.create(
        FileSystems.join(output.rstrip("/"), name)) as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
