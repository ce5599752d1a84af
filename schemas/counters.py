"""Names of the pipeline's Beam counters: one namespace, each name spelled here.

They are shown at the end of a local run and in the Dataflow UI while a job
runs; the manifest's counts (`schemas.manifest`) are the audited figures.
"""

from schemas.quality import QUALITY_FLAGS
from schemas.tables import Stage

COUNTER_NAMESPACE = "busi"

# Preprocessing: archive entries and input files read, and what they became.
COUNTER_MEMBERS_SEEN = "members_seen"
COUNTER_IMAGES_DECODED = "images_decoded"
COUNTER_MASKS_SKIPPED = "masks_skipped"
COUNTER_DECODE_ERRORS = "decode_errors"  # any failure of DecodeImages
# Scoring: intact TFRecord records read, and the prediction rows made.
COUNTER_RECORDS_READ = "records_read"
COUNTER_PREDICTIONS = "predictions"
COUNTER_LOW_CONFIDENCE = "low_confidence"
COUNTER_OUT_OF_DISTRIBUTION = "out_of_distribution"
COUNTER_NEEDS_REVIEW = "needs_review"
# Left out of scoring by --skip_scored (beam_pipeline.skip_scored).
COUNTER_ALREADY_SCORED = "already_scored"

_PREDICTED_PREFIX = "predicted_"
_ERRORS_PREFIX = "errors_"
_QUALITY_PREFIX = "quality_"


def predicted_counter(label: str) -> str:
  """Counter of the rows predicted as `label`, e.g. `predicted_benign`."""
  return _PREDICTED_PREFIX + label


def errors_counter(stage: Stage) -> str:
  """Counter of the error rows of one stage, e.g. `errors_decode`."""
  return _ERRORS_PREFIX + Stage(stage).value


def quality_counter(flag: str) -> str:
  """Counter of the images with one quality flag, e.g. `quality_blank`."""
  return _QUALITY_PREFIX + flag


# The order a person reads them in (`counter_rank`).
_ORDER = (
    (COUNTER_MEMBERS_SEEN, COUNTER_RECORDS_READ, COUNTER_IMAGES_DECODED,
     COUNTER_MASKS_SKIPPED, COUNTER_DECODE_ERRORS, COUNTER_PREDICTIONS,
     COUNTER_LOW_CONFIDENCE, COUNTER_OUT_OF_DISTRIBUTION,
     COUNTER_NEEDS_REVIEW, _PREDICTED_PREFIX, COUNTER_ALREADY_SCORED)
    + tuple(errors_counter(stage) for stage in Stage)
    + tuple(quality_counter(flag) for flag in QUALITY_FLAGS))


def counter_rank(name: str) -> tuple:
  """Sort key of counter names: the order above, `predicted_<class>` after
  COUNTER_NEEDS_REVIEW by name, unknown names last."""
  key = _PREDICTED_PREFIX if name.startswith(_PREDICTED_PREFIX) else name
  rank = _ORDER.index(key) if key in _ORDER else len(_ORDER)
  return rank, name
