"""The run manifest (`manifest.json`, written last by every pipeline run):
its fields, its count names and the sub-fields of its flag-rate check.

The pipeline writes them (`beam_pipeline.pipeline.manifest_base`,
`beam_pipeline.outputs.finish_manifest`, `busi_core.flag_rates.check`); the
run summary, `--skip_scored`, the run report and `compare` read them.
"""

from schemas.tables import (COLUMN_LOW_CONFIDENCE, COLUMN_NEEDS_REVIEW,
                            COLUMN_OUT_OF_DISTRIBUTION)

# Fields known before the run (beam_pipeline.pipeline.manifest_base).
MANIFEST_RUN_ID = "run_id"
MANIFEST_COMMAND = "command"  # one of COMMANDS
COMMAND_PREPROCESS = "preprocess"  # archives → TFRecords
COMMAND_SCORE = "score"  # TFRecords → predictions
COMMAND_RUN = "run"  # archives → TFRecords and predictions, one job
COMMANDS = (COMMAND_PREPROCESS, COMMAND_SCORE, COMMAND_RUN)
MANIFEST_INPUTS = "inputs"  # the --input globs, credentials stripped
MANIFEST_INPUTS_MATCHED = "inputs_matched"
MANIFEST_OUTPUT = "output"
MANIFEST_IMAGE_SIZE = "image_size"
MANIFEST_FORMAT_VERSION = "format_version"
MANIFEST_PACKAGE_VERSION = "package_version"
MANIFEST_STARTED_AT = "started_at"
# Scoring runs only: the model and how it was applied.
MANIFEST_MODEL = "model"
MANIFEST_MODEL_VERSION = "model_version"
MANIFEST_THRESHOLD = "threshold"
MANIFEST_OOD_THRESHOLD = "ood_threshold"  # null: the model has no detector
MANIFEST_LABELS = "labels"
MANIFEST_BATCH_SIZE = "batch_size"
# The artifact's metadata `warnings` (what train found wrong with the model,
# e.g. one class predicted for every validation image, or a class never
# predicted): [] when train's checks found none, null when the artifact
# predates them; absent in runs from before the field.
MANIFEST_MODEL_WARNINGS = "model_warnings"
# The artifact's metadata `recalibration` → `warnings` (what `recalibrate`
# found on the site sample that no temperature or threshold can fix): []
# when its check found none, null when the artifact is not recalibrated or
# was recalibrated before the check; absent in runs from before the field.
MANIFEST_MODEL_RECALIBRATION_WARNINGS = "model_recalibration_warnings"
# --skip_scored: what the run skipped against (globs and runs).
MANIFEST_SKIP_SCORED = "skip_scored"
SKIP_SCORED_GLOBS = "globs"
SKIP_SCORED_RUNS = "runs"

# Fields written when the run finishes (beam_pipeline.outputs).
MANIFEST_COUNTS = "counts"
MANIFEST_INVARIANT = "invariant"
INVARIANT_RULE = "rule"  # the sum it checks, in words
INVARIANT_HOLDS = "holds"
# false when the invariant does not hold or LOSS_COUNTS are non-zero
# (exit status 5).
MANIFEST_COMPLETE = "complete"
MANIFEST_INCOMPLETE_BECAUSE = "incomplete_because"  # the non-zero LOSS_COUNTS
MANIFEST_FINISHED_AT = "finished_at"
MANIFEST_WALL_TIME_S = "wall_time_s"
MANIFEST_THROUGHPUT = "throughput_images_per_s"  # scoring runs
# Scoring runs: images per predicted class, and per quality flag.
MANIFEST_PREDICTED_CLASSES = "predicted_classes"
MANIFEST_QUALITY_FLAGS = "quality_flags"
# Keys `pipeline.execute` adds to the manifest it answers with; not fields
# of manifest.json (the job writes that before its counters are committed):
# the job's committed Beam counters, and for a run that wrote no manifest
# (e.g. a Dataflow --dry_run) the runner's state.
EXECUTE_COUNTERS = "counters"
EXECUTE_STATE = "state"

# Counts ("counts"). A member's outcomes, checked by the invariant:
#   members_seen [+ extra_frames] = images_written | predictions
#                                   [+ already_scored] + masks_skipped + errors
COUNT_MEMBERS_SEEN = "members_seen"  # archive members, files or records read
COUNT_IMAGES_WRITTEN = "images_written"  # preprocessing
COUNT_PREDICTIONS = "predictions"  # scoring
COUNT_MASKS_SKIPPED = "masks_skipped"  # BUSI lesion masks, never scored
COUNT_ERRORS = "errors"  # rows of the errors table that are outcomes
# Frames of multi-frame DICOMs beyond each file's first (each an outcome of
# its own), and frames left unread by --max_frames_per_file.
COUNT_EXTRA_FRAMES = "extra_frames"
COUNT_FRAMES_SKIPPED = "frames_skipped"
# Incremental scoring (--skip_scored): images left out because earlier runs
# hold their prediction by the same model version. A member outcome of its
# own: in the manifest's invariant when the run counts it.
COUNT_ALREADY_SCORED = "already_scored"
# Scoring: rows flagged, by the prediction column that flags them; and Grad-CAM
# failures (error rows of stage "gradcam" outside the invariant: those images
# have their prediction row).
COUNT_LOW_CONFIDENCE = COLUMN_LOW_CONFIDENCE
COUNT_OUT_OF_DISTRIBUTION = COLUMN_OUT_OF_DISTRIBUTION
COUNT_NEEDS_REVIEW = COLUMN_NEEDS_REVIEW
COUNT_GRADCAM_FAILURES = "gradcam_failures"
# What the inputs promised but the run could not read (beyond the error rows
# it wrote): any of them non-zero makes the run incomplete.
COUNT_SHARDS_UNREAD = "shards_unread"  # TFRecord shards broken before their end
COUNT_INPUTS_VANISHED = "inputs_vanished"  # matched at launch, gone when read
LOSS_COUNTS = (COUNT_SHARDS_UNREAD, COUNT_INPUTS_VANISHED)

# The manifest's check of a scoring run's flagged shares against the
# artifact's held-out ones (busi_core.flag_rates): raised when the run's
# share exceeds the expected one by FLAG_RATE_MARGIN or more and a one-sided
# binomial test gives p < FLAG_RATE_ALPHA. One entry per flag column.
MANIFEST_FLAG_RATES = "flag_rates"
FLAG_RATE_MARGIN = 0.10
FLAG_RATE_ALPHA = 1e-3
# An entry's fields. Fixed at launch: the expected share (null when there is
# none, with why), where it comes from, how many images measured it, whether
# it was measured on the images it was fitted on, and a source that recorded
# a share but was passed over ({source: why}; absent when none was).
FLAG_RATE_SHARE = "share"
FLAG_RATE_WHY = "why"
FLAG_RATE_FROM = "from"
FLAG_RATE_IMAGES = "images"
FLAG_RATE_IN_SAMPLE = "in_sample"
FLAG_RATE_PASSED_OVER = "passed_over"
# Added when the run finishes: the run's images and flagged ones, its share,
# the p-value and the verdict.
FLAG_RATE_IMAGES_SCORED = "images_scored"
FLAG_RATE_FLAGGED = "flagged"
FLAG_RATE_OBSERVED = "observed"
FLAG_RATE_P_VALUE = "p_value"
FLAG_RATE_RAISED = "raised"
# Where the expected share comes from.
FLAG_RATE_FROM_RECALIBRATION = "recalibration"
FLAG_RATE_FROM_CROSS_VALIDATION = "cross_validation"
FLAG_RATE_FROM_TEST = "test"
FLAG_RATE_FROM_VALIDATION = "validation"
FLAG_RATE_FROM_OOD_PASS_RATE = "ood_pass_rate"
