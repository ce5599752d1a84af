"""metadata.json as typed records: `ArtifactMetadata` and its blocks.

Each record is a frozen dataclass whose field names are the JSON keys, in the
order training writes them; `to_json()` gives the dict that is written and
`from_json()` checks a dict's types (with the field's path in the message)
and builds the record. A round trip keeps every key and value:

- A field the JSON lacks (metadata written before it existed, or a block a
  writer leaves out) reads as None and stays absent when written back; a
  field given as None (`"target_accuracy": null`) is written as null. When
  constructing a record, a field not passed is absent.
- Keys a record does not know are kept in its `extra` and written back.
- Numbers keep their JSON type (an int in a float field stays an int).

Free-form JSON that only plots and reports read (training history,
reliability diagrams, cross-validation figure tables) is kept as read.

Only the top level has required fields (schemas.METADATA_REQUIRED_FIELDS);
every block field may be absent. Ranges and cross-file checks (labels.json,
model.keras) are busi_core.artifact's: this module knows only the shape.
"""

import collections.abc
import dataclasses
import functools
import typing
from typing import Any, Dict, FrozenSet, Mapping, Optional, Tuple, Type, TypeVar

# Free-form JSON, kept as read.
JSON = Any

# The fields `training.saving.save_artifact` stamps on every save (from the
# saved model.keras and this release); a derived artifact never inherits
# them from its parent.
STAMPED_FIELDS = ("model_version", "created_at", "model_sha256",
                  "format_version", "package_version")


class MetadataError(ValueError):
  """A metadata dict does not have the declared shape; says which field."""


class _Absent:
  """Default of a field that was not given: read as None, not written."""

  def __repr__(self) -> str:
    return "ABSENT"


_ABSENT: Any = _Absent()

_R = TypeVar("_R", bound="Record")


def optional() -> Any:
  """A field that may be absent from the JSON (None when it is)."""
  return dataclasses.field(default=_ABSENT)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
  """Base of the metadata records: absent fields, extra keys, JSON."""
  # JSON keys this record does not declare, written back as they were.
  extra: Mapping[str, JSON] = dataclasses.field(default_factory=dict)
  # Fields that are None because the JSON (or constructor) left them out.
  _absent: FrozenSet[str] = dataclasses.field(default=frozenset(),
                                              repr=False, compare=False)

  def __post_init__(self):
    absent = set(self._absent)
    for f in _declared(type(self)):
      if getattr(self, f.name) is _ABSENT:
        object.__setattr__(self, f.name, None)
        absent.add(f.name)
    object.__setattr__(self, "_absent", frozenset(absent))

  def to_json(self) -> Dict[str, JSON]:
    """The JSON-ready dict: declared fields in order, then `extra`."""
    result = {}
    for f in _declared(type(self)):
      value = getattr(self, f.name)
      if value is None and f.name in self._absent:
        continue
      result[f.name] = _dump(value)
    for key, value in self.extra.items():
      result.setdefault(key, _dump(value))
    return result

  @classmethod
  def from_json(cls: Type[_R], data: Any, path: str = "") -> _R:
    """The record of a dict read from JSON.

    Args:
      data: the dict (as json.load returns it).
      path: where it sits, for messages ("calibration.").

    Raises:
      MetadataError: a required field is missing, or a field has the wrong
        type; the message names the field.
    """
    if not isinstance(data, Mapping):
      raise MetadataError(f"field {path.rstrip('.') or '(top level)'} is"
                          f" {_show(data)}, not a JSON object")
    hints = _hints(cls)
    given, missing = {}, []
    for f in _declared(cls):
      if f.name in data:
        given[f.name] = _load(hints[f.name], data[f.name], path + f.name)
      elif f.default is dataclasses.MISSING:
        missing.append(path + f.name)
    if missing:
      raise MetadataError(f"lacks {', '.join(missing)}")
    names = {f.name for f in _declared(cls)}
    return cls(**given, extra={k: v for k, v in data.items()
                               if k not in names})

  def replace(self: _R, **changes: Any) -> _R:
    """A copy with `changes`, each given (written even if None).

    (`dataclasses.replace` keeps an absent field absent when set to None.)
    """
    return dataclasses.replace(self, _absent=self._absent - changes.keys(),
                               **changes)

  def as_kwargs(self) -> Dict[str, Any]:
    """The fields given (not absent) and `extra`: the keyword arguments that
    build this record again, to pass on with some of them replaced."""
    kwargs = {f.name: getattr(self, f.name) for f in _declared(type(self))
              if f.name not in self._absent}
    kwargs["extra"] = self.extra
    return kwargs


@functools.lru_cache(maxsize=None)
def _declared(cls) -> Tuple[dataclasses.Field, ...]:
  """The record's own JSON fields (not extra / _absent)."""
  return tuple(f for f in dataclasses.fields(cls)
               if f.name not in ("extra", "_absent"))


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
  return typing.get_type_hints(cls)


def _dump(value: Any) -> JSON:
  if isinstance(value, Record):
    return value.to_json()
  if isinstance(value, (list, tuple)):
    return [_dump(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _dump(v) for k, v in value.items()}
  return value


def _show(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


_KINDS = {str: "a string", int: "an integer", float: "a number",
          bool: "true or false"}


def _load(hint: Any, value: Any, path: str) -> Any:
  """`value` checked against the type hint (and records built)."""
  if hint is Any:
    return value
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is typing.Union:  # Optional[X]
    if value is None and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    return _load(inner[0], value, path)
  if isinstance(hint, type) and issubclass(hint, Record):
    return hint.from_json(value, path + ".")
  if origin is tuple:
    if not isinstance(value, list):
      raise MetadataError(f"field {path} is {_show(value)}, not a list")
    return tuple(_load(args[0], v, f"{path}[{i}]")
                 for i, v in enumerate(value))
  if origin in (dict, collections.abc.Mapping):
    if not isinstance(value, Mapping):
      raise MetadataError(f"field {path} is {_show(value)}, not a JSON object")
    return {k: _load(args[1], v, f"{path}.{k}") for k, v in value.items()}
  ok = (isinstance(value, hint) and not
        (isinstance(value, bool) and hint is not bool))
  if hint is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if not ok:
    raise MetadataError(f"field {path} is {_show(value)}, not"
                        f" {_KINDS.get(hint, hint.__name__)}")
  return value


# --- The blocks, innermost first. -------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlagStats(Record):
  """What a review threshold flags on a labelled set
  (`training.calibration.flag_stats`): flagged means confidence < threshold.
  The accuracies are None where their group is empty."""
  threshold: Optional[float] = optional()
  count: Optional[int] = optional()
  flagged: Optional[int] = optional()
  flagged_share: Optional[float] = optional()
  accuracy_confident: Optional[float] = optional()  # on the images not flagged
  accuracy_flagged: Optional[float] = optional()
  accuracy: Optional[float] = optional()  # on all


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedFlagging(Record):
  """What the fixed --threshold would flag (reported beside a chosen one)."""
  threshold: Optional[float] = optional()
  val: Optional[FlagStats] = optional()  # None: no images in the split
  test: Optional[FlagStats] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Flagging(Record):
  """The "flagging" block: the review threshold and how it was chosen."""
  source: Optional[str] = optional()  # THRESHOLD_FIXED / _TARGET_ACCURACY
  target_accuracy: Optional[float] = optional()
  target_reached: Optional[bool] = optional()  # None for a fixed threshold
  # THRESHOLD_RULES, for a chosen threshold; absent: observed (older
  # artifacts).
  rule: Optional[str] = optional()
  threshold: Optional[float] = optional()
  val: Optional[FlagStats] = optional()
  test: Optional[FlagStats] = optional()
  fixed: Optional[FixedFlagging] = optional()
  # For a chosen threshold: THRESHOLD_ON (absent: validation) and how many
  # images it was chosen on.
  chosen_on: Optional[str] = optional()
  chosen_count: Optional[int] = optional()
  # Chosen on cv's out-of-fold predictions: how, and how it held.
  out_of_fold: Optional["OutOfFoldFlagging"] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration(Record):
  """The "calibration" block: the temperature fitted on validation, and the
  expected calibration error on test before and after."""
  temperature: Optional[float] = optional()
  fitted: Optional[bool] = optional()
  reason: Optional[str] = optional()  # why not fitted
  fit_split: Optional[str] = optional()
  fit_count: Optional[int] = optional()
  nll_before: Optional[float] = optional()
  nll_after: Optional[float] = optional()
  at_bound: Optional[bool] = optional()
  rejected_temperature: Optional[float] = optional()  # fitted at the bound
  split: Optional[str] = optional()  # where the ECE is measured
  bins: Optional[int] = optional()
  count: Optional[int] = optional()
  ece_before: Optional[float] = optional()
  ece_after: Optional[float] = optional()
  reliability_before: JSON = optional()  # calibration.reliability
  reliability_after: JSON = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scores(Record):
  """Precision, recall and F1 of one class (support) or their macro mean."""
  precision: Optional[float] = optional()
  recall: Optional[float] = optional()
  f1: Optional[float] = optional()
  support: Optional[int] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassificationReport(Record):
  """`training.metrics.classification_report`: "test_metrics"."""
  count: Optional[int] = optional()
  accuracy: Optional[float] = optional()
  per_class: Optional[Mapping[str, Scores]] = optional()
  macro: Optional[Scores] = optional()
  labels: Optional[Tuple[str, ...]] = optional()
  confusion_matrix: Optional[Tuple[Tuple[int, ...], ...]] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainingSettings(Record):
  """The "training" block: the flags, what the run read and did, timings."""
  untrained_test_artifact: Optional[bool] = optional()  # testing.py's
  epochs: Optional[int] = optional()
  fine_tune_epochs: Optional[int] = optional()
  # first base layer fine-tuned, with all after it; None: block5's first
  fine_tune_from: Optional[str] = optional()
  patience: Optional[int] = optional()
  label_smoothing: Optional[float] = optional()
  # momentum of the weights' moving average the head stage kept, and the
  # fine-tune unless fine_tune_ema_momentum says otherwise (0: none);
  # absent: none (older artifacts)
  ema_momentum: Optional[float] = optional()
  # the fine-tune stage's (--fine_tune_ema_momentum, resolved); None where no
  # fine-tune ran; absent with a fine-tune: as ema_momentum (older artifacts)
  fine_tune_ema_momentum: Optional[float] = optional()
  malignant_weight: Optional[float] = optional()  # x its balanced weight
  cv_folds: Optional[int] = optional()
  epochs_run: Optional[Mapping[str, int]] = optional()  # stage → epochs
  best_epoch: Optional[Mapping[str, Optional[int]]] = optional()
  seed: Optional[int] = optional()
  val_fraction: Optional[float] = optional()
  test_fraction: Optional[float] = optional()
  augment: Optional[bool] = optional()
  augment_views: Optional[int] = optional()
  # the views that had the scanner degradations (training.augment.degrade);
  # () or absent: none
  degraded_views: Optional[Tuple[int, ...]] = optional()
  # the random views that drew synthetic burned-in annotations
  # (training.augment.annotate), each image's with probability
  # training.augment.ANNOTATE.probability; () or absent: none
  annotated_views: Optional[Tuple[int, ...]] = optional()
  # the probability that one of those views of an image carries them
  annotate_probability: Optional[float] = optional()
  # the random views that were, each image's with probability
  # depth_probability, framed as a deeper depth setting shows them
  # (training.augment.deepen: scaled by a factor in depth_scale from the top
  # edge, on black); () or absent: none
  deepened_views: Optional[Tuple[int, ...]] = optional()
  depth_probability: Optional[float] = optional()
  depth_scale: Optional[Tuple[float, float]] = optional()
  calibrate: Optional[bool] = optional()
  synthetic_data: Optional[bool] = optional()
  batch_size: Optional[int] = optional()
  learning_rate: Optional[float] = optional()
  fine_tune_learning_rate: Optional[float] = optional()
  # FINE_TUNE_SCHEDULES; absent: constant (older artifacts)
  fine_tune_schedule: Optional[str] = optional()
  # arithmetic of the frozen-base pass and the fine-tune stage (float32 or
  # bfloat16: Keras mixed precision); the saved weights are float32 always
  precision: Optional[str] = optional()
  class_weight: Optional[Mapping[str, float]] = optional()
  data: Optional[Tuple[str, ...]] = optional()  # the --data globs
  examples_read: Optional[int] = optional()
  unlabelled_skipped: Optional[int] = optional()
  duplicates_skipped: Optional[int] = optional()
  conflicting_labels_skipped: Optional[int] = optional()
  near_duplicates_grouped: Optional[int] = optional()
  history: JSON = optional()  # metric → value per epoch
  seconds: Optional[Mapping[str, float]] = optional()  # step → wall seconds
  epoch_seconds: JSON = optional()  # stage → seconds per epoch


@dataclasses.dataclass(frozen=True, kw_only=True)
class FigureSummary(Record):
  """One figure over the folds: mean, sample sd, folds it is defined on."""
  mean: Optional[float] = optional()
  sd: Optional[float] = optional()
  n: Optional[int] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutOfFoldFold(FlagStats):
  """One fold at the threshold the other folds' predictions chose."""
  fold: Optional[int] = optional()
  target_reached: Optional[bool] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutOfFoldFlagging(Record):
  """A review threshold chosen on cv's out-of-fold predictions
  (`training.cv.out_of_fold_flagging`; cv.json's CV_OUT_OF_FOLD_FLAGGING,
  and "flagging" → "out_of_fold" of an artifact whose threshold it is)."""
  rule: Optional[str] = optional()  # THRESHOLD_RULES
  target_accuracy: Optional[float] = optional()
  count: Optional[int] = optional()  # predictions it was chosen on
  threshold: Optional[float] = optional()
  target_reached: Optional[bool] = optional()
  # Each fold at the threshold chosen the same way on the others; pooled,
  # every row at its fold's (threshold null); mean ± sd over folds of
  # flagged_share and accuracy_confident.
  folds: Optional[Tuple[OutOfFoldFold, ...]] = optional()
  pooled: Optional[FlagStats] = optional()
  summary: Optional[Mapping[str, FigureSummary]] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class FoldSummary(Record):
  """One fold of the cross-validation (no image ids)."""
  fold: Optional[int] = optional()
  counts: Optional[Mapping[str, int]] = optional()  # split → images
  temperature: Optional[float] = optional()
  threshold: Optional[float] = optional()
  target_reached: Optional[bool] = optional()
  test: JSON = optional()  # the fold's figures (training.cv.fold_metrics)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CrossValidationSummary(Record):
  """The "cross_validation" block (`training.cv.card_summary`)."""
  folds: Optional[int] = optional()
  images: Optional[int] = optional()
  groups: Optional[int] = optional()  # near-duplicate groups
  data_fingerprint: Optional[str] = optional()
  pooled: Optional[Mapping[str, JSON]] = optional()  # figure → value
  pooled_confusion_matrix: JSON = optional()
  summary: Optional[Mapping[str, FigureSummary]] = optional()  # figure →
  per_fold: Optional[Tuple[FoldSummary, ...]] = optional()
  # CV_SOURCE_TRAIN (absent in older artifacts) or CV_SOURCE_REPORT
  source: Optional[str] = optional()
  # The folds' Grad-CAM against lesion masks, pooled (`cv --masks`; a
  # schemas.evaluation.LesionLocalisation as JSON); absent without masks.
  lesion_localisation: Optional[Mapping[str, JSON]] = optional()
  # CV_WARNINGS: what cv found wrong with its fold models (the model card
  # shows them above the figures); absent: a report written before them.
  warnings: Optional[Tuple[str, ...]] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecalibrationParent(Record):
  """The artifact a recalibrated one was derived from, as it was."""
  model_dir: Optional[str] = optional()
  model_version: Optional[str] = optional()
  model_sha256: Optional[str] = optional()
  temperature: Optional[float] = optional()
  threshold: Optional[float] = optional()
  threshold_source: Optional[str] = optional()
  target_accuracy: Optional[float] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecalibratedTemperature(Record):
  """The temperature refitted on the site sample's fit part."""
  temperature: Optional[float] = optional()  # what the new model uses
  fitted: Optional[bool] = optional()  # False: the parent's was kept
  reason: Optional[str] = optional()
  fit_count: Optional[int] = optional()
  fitted_value: Optional[float] = optional()  # the raw search result
  at_bound: Optional[bool] = optional()
  nll_parent: Optional[float] = optional()  # fit part, parent's temperature
  nll_after: Optional[float] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecalibratedThreshold(Record):
  """The threshold rechosen (or fixed) on the site sample's fit part."""
  threshold: Optional[float] = optional()
  source: Optional[str] = optional()
  target_accuracy: Optional[float] = optional()
  target_reached: Optional[bool] = optional()
  rule: Optional[str] = optional()  # THRESHOLD_RULES; absent: observed
  fit: Optional[FlagStats] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiteFigures(Record):
  """One (temperature, threshold) on the site sample's held-out part."""
  temperature: Optional[float] = optional()
  threshold: Optional[float] = optional()
  count: Optional[int] = optional()
  flagged: Optional[int] = optional()
  flagged_share: Optional[float] = optional()
  accuracy_confident: Optional[float] = optional()
  accuracy_flagged: Optional[float] = optional()
  accuracy: Optional[float] = optional()
  ece: Optional[float] = optional()
  nll: Optional[float] = optional()
  reliability: JSON = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecalibrationCheck(Record):
  """Parent's and new calibration compared on the held-out part."""
  part: Optional[str] = optional()  # the part measured on
  in_sample: Optional[bool] = optional()  # --holdout_fraction 0
  count: Optional[int] = optional()
  before: Optional[SiteFigures] = optional()  # the parent's
  after: Optional[SiteFigures] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recalibration(Record):
  """The "recalibration" block of `python -m training recalibrate`."""
  parent: Optional[RecalibrationParent] = optional()
  data: Optional[Tuple[str, ...]] = optional()
  data_fingerprint: Optional[Mapping[str, str]] = optional()
  examples_read: Optional[int] = optional()
  unlabelled_skipped: Optional[int] = optional()
  unknown_label_skipped: Optional[int] = optional()
  duplicates_skipped: Optional[int] = optional()
  conflicting_labels_skipped: Optional[int] = optional()
  images: Optional[int] = optional()
  holdout_fraction: Optional[float] = optional()
  seed: Optional[int] = optional()
  near_duplicates_grouped: Optional[int] = optional()
  # part → images per class (None: the part is the fit part itself)
  class_counts: Optional[Mapping[str, Optional[Mapping[str, int]]]] = (
      optional())
  temperature: Optional[RecalibratedTemperature] = optional()
  threshold: Optional[RecalibratedThreshold] = optional()
  check: Optional[RecalibrationCheck] = optional()
  # What the site sample showed that recalibration cannot fix
  # (`training.evaluate.site_warnings`: one class predicted for all of it,
  # else a class it holds at least five of never predicted), as sentences;
  # recalibrate's summary, the model card, evaluate, doctor and every
  # scoring run (its log, manifest, summary, report and compare) repeat
  # them. Empty: nothing; absent: recalibrated before the check.
  warnings: Optional[Tuple[str, ...]] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class OodCount(Record):
  """How many images of a set the out-of-distribution threshold flags."""
  count: Optional[int] = optional()
  flagged: Optional[int] = optional()
  flagged_share: Optional[float] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class OodDetector(Record):
  """The "ood" block: the out-of-distribution detector saved as OOD_FILE
  (absent: the artifact has none, and the OOD columns are null)."""
  method: Optional[str] = optional()  # schemas.OOD_METHOD_*
  transform: Optional[str] = optional()  # schemas.OOD_TRANSFORMS
  feature_layer: Optional[str] = optional()  # schemas.FEATURES_LAYER
  dims: Optional[int] = optional()  # length of a feature vector
  file: Optional[str] = optional()  # schemas.OOD_FILE
  sha256: Optional[str] = optional()  # of the file; loading checks it
  fit_split: Optional[str] = optional()  # whose features it was fitted on
  fit_count: Optional[int] = optional()  # feature vectors (images × views)
  fit_images: Optional[int] = optional()
  shrinkage: Optional[float] = optional()  # Ledoit-Wolf's, in [0, 1]
  threshold: Optional[float] = optional()  # scores above it are flagged
  # where it was chosen: "val+train_out_of_fold" (training) or "val"
  threshold_split: Optional[str] = optional()
  target_pass_rate: Optional[float] = optional()
  val: Optional[OodCount] = optional()  # None: no images in the split
  # The training images, each scored by a detector fitted without it.
  train_out_of_fold: Optional[OodCount] = optional()
  test: Optional[OodCount] = optional()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArtifactMetadata(Record):
  """metadata.json. The fields without a default are the required ones
  (schemas.METADATA_REQUIRED_FIELDS, in that order)."""
  model_version: str  # NAME-YYYYmmddTHHMMSSZ-SHA8 (busi_core.artifact)
  created_at: str
  image_size: int  # the model's input is image_size² uint8 RGB
  threshold: float  # review flag: top probability below it
  temperature: float  # of the model's TemperatureScaling layer
  labels: Tuple[str, ...]  # output order; labels.json holds the same
  backbone: str
  weights_source: str
  data_fingerprint: Mapping[str, str]  # split (and "overall") → sha256
  class_counts: Mapping[str, Mapping[str, int]]  # split → class → images
  test_metrics: ClassificationReport
  format_version: str  # schemas.ARTIFACT_FORMAT_VERSION
  package_version: str
  name: Optional[str] = optional()  # model_version's prefix
  threshold_source: Optional[str] = optional()  # THRESHOLD_FIXED if absent
  target_accuracy: Optional[float] = optional()
  calibration: Optional[Calibration] = optional()
  flagging: Optional[Flagging] = optional()
  training: Optional[TrainingSettings] = optional()
  cross_validation: Optional[CrossValidationSummary] = optional()
  model_sha256: Optional[str] = optional()  # absent before it existed
  parent_model_version: Optional[str] = optional()  # recalibrated only
  parent_model_sha256: Optional[str] = optional()
  recalibration: Optional[Recalibration] = optional()
  ood: Optional[OodDetector] = optional()  # None: no OOD detector
  # The backbone's input size: the model resizes its image_size² input to
  # network_size² (layer RESIZE_LAYER). Absent: image_size.
  network_size: Optional[int] = optional()
  # What train found wrong with the model it wrote (today: every validation
  # or test image predicted as one class, else a class that split holds at
  # least five of never predicted there); the model card, train's and
  # recalibrate's summaries, evaluate, doctor and every scoring run (its
  # log, manifest, summary, report, and compare) repeat them.
  # Empty: train's checks found nothing (they need validation or test
  # images); absent: not written by train's checks (artifacts trained before
  # them, test artifacts, and what is recalibrated from either).
  warnings: Optional[Tuple[str, ...]] = optional()

  @property
  def is_test_artifact(self) -> bool:
    """Written by training.testing.make_test_artifact: never trained."""
    return bool(self.training and self.training.untrained_test_artifact)

  @property
  def is_synthetic(self) -> bool:
    """Trained on synthetic phantoms (--synthetic_data)."""
    return bool(self.training and self.training.synthetic_data)

  @property
  def recalibration_warnings(self) -> Optional[Tuple[str, ...]]:
    """What recalibrate found on the site sample (`recalibration` →
    `warnings`); None when not recalibrated, or recalibrated before the
    check."""
    return self.recalibration.warnings if self.recalibration else None


def required_fields() -> Tuple[str, ...]:
  """The ArtifactMetadata fields every metadata.json must have."""
  return tuple(f.name for f in _declared(ArtifactMetadata)
               if f.default is dataclasses.MISSING)
