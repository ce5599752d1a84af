"""Fields of the report `python -m training evaluate` writes (metrics.json),
and the name of the per-image table beside it.

Only the blocks that code other than the writer reads are spelled here; the
lesion-localisation block (`--masks`) is a typed record, so its fields have
one spelling for the writer (training/lesions.py), the CLI and the tests.
"""

from typing import Any, Dict, List, NamedTuple, Optional

from schemas.features import BENIGN, MALIGNANT

# The classes whose BUSI images come with a lesion mask; normal frames have
# no lesion (BUSI ships blank masks for them) and are not localised.
LESION_LABELS = (BENIGN, MALIGNANT)

# Beside metrics.json: every evaluated image, as the artifact scored it
# (schemas.tables.evaluation_predictions_schema), for SQL.
PREDICTIONS_FILE = "evaluation_predictions.parquet"

# metrics.json key of the figures over the images the artifact was not
# fitted on (no image, nor a near-duplicate of one, in its training or
# validation split or its recalibration's fit part): null when it was fitted
# on none of them (the report's own figures are those), else "count",
# "excluded", "status_unknown" (whether some of those facts were unknown and
# counted as not fitted on) and, when count > 0, the report's own figures
# over them: the classification report's fields, "ece", "reliability",
# "flagging", "auc_malignant" and "auc_malignant_vs_benign".
NOT_FITTED_ON = "not_fitted_on"

# metrics.json key of what evaluate warns of, as sentences ([] when nothing):
# the artifact's training and recalibration warnings (its metadata's
# `warnings`, `recalibration` → `warnings`), and one when
# the artifact predicts one class for every evaluated image though they hold
# several, else one for each class they hold at least five of
# (training.metrics.NEVER_PREDICTED_MIN_SUPPORT) that it never predicts.
WARNINGS = "warnings"

# metrics.json key of the LesionLocalisation block (with --masks only).
LESION_LOCALISATION = "lesion_localisation"

# What the localisation heatmaps explain (LesionLocalisation.explained).
EXPLAIN_TRUE_CLASS = "true_class"


class LocalisationScore(NamedTuple):
  """Grad-CAM against the lesion masks, over one group of lesion images.

  images = paired + unpaired + bad_mask; the rates are over the paired ones
  and None when there are none.
  """
  images: int  # benign/malignant images evaluated
  paired: int  # with a readable, non-empty lesion: the ones scored
  unpaired: int  # no mask found for the image's member path
  bad_mask: int  # masks found but unreadable, or empty at the model's size
  pointing_hit_rate: Optional[float]  # heatmap peak inside the lesion
  mean_iou: Optional[float]  # of {heatmap >= heatmap_threshold} and lesion


class LesionLocalisation(NamedTuple):
  """The `lesion_localisation` block of metrics.json."""
  overall: LocalisationScore
  per_class: Dict[str, LocalisationScore]  # LESION_LABELS the model has
  # The same paired images, explaining the class the model predicted (where
  # it differs from the true one: where it looked when it was wrong).
  predicted_class: LocalisationScore
  explained: str  # EXPLAIN_TRUE_CLASS: what overall and per_class explain
  layer: str  # the conv layer Grad-CAM weighs (GRADCAM_LAYER)
  heatmap_threshold: float  # heatmap >= this is the IoU's predicted region
  mask_threshold: int  # resized mask pixel > this (of 255) is lesion
  mask_archives: List[str]  # the archives the masks were read from
  masks_read: int  # mask members read from them
  mask_read_errors: int  # mask members that could not be read

  def to_json(self) -> Dict[str, Any]:
    """The block as JSON-ready dicts."""
    return {**self._asdict(),
            "overall": self.overall._asdict(),
            "per_class": {label: score._asdict()
                          for label, score in self.per_class.items()},
            "predicted_class": self.predicted_class._asdict()}

  @classmethod
  def from_json(cls, block: Dict[str, Any]) -> "LesionLocalisation":
    """The record back from a metrics.json block written by to_json."""
    return cls(**{**block,
                  "overall": LocalisationScore(**block["overall"]),
                  "per_class": {label: LocalisationScore(**score)
                                for label, score in block["per_class"].items()},
                  "predicted_class": LocalisationScore(
                      **block["predicted_class"])})
