"""The model artifact directory that training writes and scoring loads."""

# Files inside MODEL_DIR.
MODEL_FILE = "model.keras"  # takes raw uint8 RGB [batch, H, W, 3]; softmax out
LABELS_FILE = "labels.json"  # JSON list of class names in output order
METADATA_FILE = "metadata.json"
MODEL_CARD_FILE = "MODEL_CARD.md"

# Bumped when the artifact layout or the model's input contract changes.
ARTIFACT_FORMAT_VERSION = "1"

DEFAULT_THRESHOLD = 0.9

# The layer Grad-CAM explains (the last conv layer of VGG16).
GRADCAM_LAYER = "block5_conv3"

# Fields every metadata.json has; scoring refuses an artifact without them.
METADATA_REQUIRED_FIELDS = (
    "model_version",
    "created_at",
    "image_size",
    "threshold",
    "labels",
    "backbone",
    "weights_source",
    "data_fingerprint",
    "class_counts",
    "test_metrics",
    "format_version",
    "package_version",
)
