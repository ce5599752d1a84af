"""The one place where features, columns, labels and artifact fields are spelled.

Training, preprocessing and scoring all import these names; nothing else in
the project re-declares them.
"""

from schemas.artifact import (
    ARTIFACT_FORMAT_VERSION,
    CV_REPORT_FILE,
    GRADCAM_LAYER,
    FEATURES_LAYER,
    INPUT_NAME,
    LOGITS_LAYER,
    PREPROCESS_LAYER,
    PROBABILITIES_LAYER,
    TEMPERATURE_LAYER,
    LABELS_FILE,
    METADATA_FILE,
    METADATA_MODEL_SHA256,
    METADATA_REQUIRED_FIELDS,
    MODEL_CARD_FILE,
    MODEL_FILE,
    DEFAULT_HOLDOUT_FRACTION,
    DEFAULT_TARGET_ACCURACY,
    DEFAULT_THRESHOLD,
    METADATA_PARENT_MODEL_SHA256,
    METADATA_PARENT_MODEL_VERSION,
    METADATA_RECALIBRATION,
    RECALIBRATION_SPLIT_FILE,
    SPLIT_DHASH_KEY,
    SPLIT_FILE,
    THRESHOLD_FIXED,
    THRESHOLD_TARGET_ACCURACY,
)
from schemas.features import (
    DEFAULT_IMAGE_SIZE,
    FEATURE_CHANNELS,
    FEATURE_HEIGHT,
    FEATURE_IMAGE,
    FEATURE_IMAGE_ID,
    FEATURE_LABEL,
    FEATURE_ORIGINAL_HEIGHT,
    FEATURE_ORIGINAL_WIDTH,
    FEATURE_SOURCE,
    FEATURE_WIDTH,
    FORMAT_VERSION,
    LABELS,
    PACKAGE_VERSION,
    MANIFEST_FILE,
    COUNT_INPUTS_VANISHED,
    COUNT_SHARDS_UNREAD,
    LOSS_COUNTS,
    TFRECORD_DIR,
    TFRECORD_SUFFIX,
    ERRORS_DIR,
    PREDICTIONS_DIR,
    GRADCAM_DIR,
    feature_spec,
)
from schemas.tables import (
    error_columns,
    Stage,
    errors_schema,
    prediction_columns,
    predictions_schema,
    probability_column,
)

__all__ = [name for name in dir() if not name.startswith("_")]
