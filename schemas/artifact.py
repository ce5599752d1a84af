"""The model artifact directory that training writes and scoring loads."""

# Files inside MODEL_DIR.
MODEL_FILE = "model.keras"  # takes raw uint8 RGB [batch, H, W, 3]; softmax out
LABELS_FILE = "labels.json"  # JSON list of class names in output order
METADATA_FILE = "metadata.json"
MODEL_CARD_FILE = "MODEL_CARD.md"  # human-readable summary, every artifact
# Written by `python -m training train` beside the files above (not read by
# scoring): test-split plots, the split itself, calibration before/after.
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
TRAINING_CURVES_FILE = "training_curves.png"
# {"train": [image_id, ...], "val": ..., "test": ..., SPLIT_DHASH_KEY:
#  {"train": [16 hex digits, ...], ...}}: dHashes in the order of the ids.
SPLIT_FILE = "split.json"
SPLIT_DHASH_KEY = "dhash"
RELIABILITY_DIAGRAM_FILE = "reliability_diagram.png"

# Written by `python -m training cv` into its --output directory, and by
# `train` into the artifact (its own cross-validation, or the --cv_report it
# was given; none with --cv_folds 0).
CV_REPORT_FILE = "cv.json"
# Beside it: every image scored by the fold model that never saw it
# (schemas.tables.cv_predictions_schema), for SQL and for choosing a review
# threshold on all the data instead of one validation split.
CV_PREDICTIONS_FILE = "cv_predictions.parquet"
# cv.json block: a threshold chosen on those predictions, and each fold at
# one chosen on the others (schemas.metadata.OutOfFoldFlagging).
CV_OUT_OF_FOLD_FLAGGING = "out_of_fold_flagging"
# cv.json list (each fold's too), and the "cross_validation" block's: what
# cv found wrong with its fold models, as sentences (today: a fold model
# that predicts one class for every validation or held-out image of its
# fold, whose figures then measure a constant answer, else one that never
# predicts a class those images hold at least five of). Empty: the checks
# ran and found nothing; absent: reports written before them.
CV_WARNINGS = "warnings"
# metadata.json block: the recipe's cross-validated figures on the training
# data (null without): folds, images, settings, pooled, summary, and its
# "source": run by `train` itself, or an earlier `cv` run's report of the
# same settings and data (`train --cv_report`).
METADATA_CROSS_VALIDATION = "cross_validation"
CV_SOURCE_TRAIN = "train"
CV_SOURCE_REPORT = "cv_report"

# The out-of-distribution detector, fitted by training on the "features"
# layer of its training images (busi_core.ood) and described by
# metadata.json's "ood" block (schemas.metadata.OodDetector), which records
# the file's sha256: loading checks it. A numpy .npz of float64 arrays, read
# with allow_pickle=False. Artifacts without it load; their OOD columns are
# null.
OOD_FILE = "ood.npz"
OOD_MEAN = "mean"  # [D]: mean of the (transformed) training features
OOD_PRECISION = "precision"  # [D, D]: inverse of the shrunk covariance
OOD_ARRAYS = (OOD_MEAN, OOD_PRECISION)
# The score: Mahalanobis distance under a Ledoit-Wolf shrunk covariance.
OOD_METHOD_MAHALANOBIS = "mahalanobis_ledoit_wolf"
# Transforms applied to the features before the distance.
OOD_TRANSFORM_NONE = "none"
OOD_TRANSFORM_SQRT = "sqrt"  # GAP of ReLU maps is non-negative and skewed
OOD_TRANSFORM_L2 = "l2"  # unit length: direction only
# Square root, then unit length: the default. Measured on real BUSI against
# 65 images that are not ultrasound (training/README.md, "Out-of-distribution
# detector"), it caught them all where the others let 1-7 % through.
OOD_TRANSFORM_SQRT_L2 = "sqrt_l2"
OOD_TRANSFORMS = (OOD_TRANSFORM_NONE, OOD_TRANSFORM_SQRT, OOD_TRANSFORM_L2,
                  OOD_TRANSFORM_SQRT_L2)
# Share of in-distribution validation images whose score passes the
# threshold training chooses (the rest are flagged).
DEFAULT_OOD_PASS_RATE = 0.99

# Bumped when the artifact layout or the model's input contract changes.
ARTIFACT_FORMAT_VERSION = "1"

DEFAULT_THRESHOLD = 0.9

# The layer Grad-CAM explains (the last conv layer of VGG16).
GRADCAM_LAYER = "block5_conv3"
# VGG16's conv layers in order: the layers --fine_tune_from may name
# (metadata training.fine_tune_from records the first one fine-tuned).
VGG16_CONV_LAYERS = tuple(
    f"block{block}_conv{conv}"
    for block, convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for conv in range(1, convs + 1))
# Layer names of the artifact's model that scoring, Grad-CAM and the
# out-of-fold tooling look up.
INPUT_NAME = "image"
PREPROCESS_LAYER = "vgg_preprocess"
# Area resize of the preprocessed image to the backbone's input size
# (metadata "network_size"); absent when the two sizes are equal.
RESIZE_LAYER = "network_resize"
FEATURES_LAYER = "features"  # GlobalAveragePooling2D: the cached features
LOGITS_LAYER = "logits"
TEMPERATURE_LAYER = "temperature"
PROBABILITIES_LAYER = "probabilities"

# Fields every metadata.json has; scoring refuses an artifact without them.
METADATA_REQUIRED_FIELDS = (
    "model_version",
    "created_at",
    "image_size",
    "threshold",
    "temperature",  # of the model's TemperatureScaling layer (1.0: none)
    "labels",
    "backbone",
    "weights_source",
    "data_fingerprint",
    "class_counts",
    "test_metrics",
    "format_version",
    "package_version",
)

# sha256 hex of model.keras, written by save_artifact. Loading checks it, so
# a model.keras swapped in after training cannot score under the old
# model_version. (Artifacts saved before it existed are checked against the
# digest prefix that ends model_version.)
METADATA_MODEL_SHA256 = "model_sha256"

# Written by `python -m training recalibrate` into the new artifact: the
# artifact it was derived from (whose weights it shares) and what was refitted
# on the site sample (temperature, threshold, figures before and after).
METADATA_PARENT_MODEL_VERSION = "parent_model_version"
METADATA_PARENT_MODEL_SHA256 = "parent_model_sha256"
METADATA_RECALIBRATION = "recalibration"
# {"fit": [image_id, ...], "holdout": [...], SPLIT_DHASH_KEY: {"fit": [16 hex
#  digits, ...], ...}}: how recalibrate split its site sample.
RECALIBRATION_SPLIT_FILE = "recalibration_split.json"
# Its parts (also the keys of the "recalibration" block's data_fingerprint and
# class_counts): the temperature was fitted and the threshold chosen on the
# fit part; the parent and the new calibration are compared on the held-out.
RECALIBRATION_FIT = "fit"
RECALIBRATION_HOLDOUT = "holdout"

# metadata "threshold_source": a fixed --threshold, or chosen for
# --target_accuracy.
THRESHOLD_FIXED = "fixed"
THRESHOLD_TARGET_ACCURACY = "target_accuracy"
# metadata "flagging" → "rule" (and recalibration "threshold" → "rule"): how
# the accuracy of the images not flagged is estimated when the threshold is
# chosen for a target: the mean calibrated confidence ("expected"), or the
# validation images' own accuracy ("observed"; what artifacts without the
# field used).
THRESHOLD_RULE_EXPECTED = "expected"
THRESHOLD_RULE_OBSERVED = "observed"
THRESHOLD_RULES = (THRESHOLD_RULE_EXPECTED, THRESHOLD_RULE_OBSERVED)
DEFAULT_THRESHOLD_RULE = THRESHOLD_RULE_EXPECTED
# metadata "flagging" → "chosen_on": the images a --target_accuracy threshold
# was chosen on: the validation split, or the out-of-fold predictions of the
# cross-validation the artifact carries (`train --threshold_on`; absent:
# validation, what artifacts without the field used).
THRESHOLD_ON_VALIDATION = "validation"
THRESHOLD_ON_CV = "cv"
THRESHOLD_ON = (THRESHOLD_ON_VALIDATION, THRESHOLD_ON_CV)
# metadata "training" → "fine_tune_schedule": how the fine-tune stage's rate
# moves over its steps: held at --fine_tune_learning_rate ("constant"; what
# artifacts without the field used), or decayed from it to 0 along a cosine
# over the stage's epochs ("cosine").
FINE_TUNE_SCHEDULE_CONSTANT = "constant"
FINE_TUNE_SCHEDULE_COSINE = "cosine"
FINE_TUNE_SCHEDULES = (FINE_TUNE_SCHEDULE_CONSTANT, FINE_TUNE_SCHEDULE_COSINE)
# Target accuracy of the images not flagged that recalibrate chooses the
# threshold for when no --threshold is given.
DEFAULT_TARGET_ACCURACY = 0.95
# Share of recalibrate's site sample held out to report on.
DEFAULT_HOLDOUT_FRACTION = 0.3
