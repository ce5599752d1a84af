"""Names and validated settings of a training run (no TensorFlow imported).

Kept apart from the model and the training loop so that the command line
parses and checks flags, and `python -m training phantoms` runs, without
loading TensorFlow.
"""

import dataclasses
from typing import Optional, Tuple

import schemas

VGG16 = "vgg16"
TINY = "tiny"  # a 2-conv stand-in for tests, not a real classifier
BACKBONES = (VGG16, TINY)
# Each backbone's base layers with weights, in order: what --fine_tune_from
# may name (checked before any data is read; a test checks the lists against
# the built models).
FINE_TUNABLE_LAYERS = {VGG16: schemas.VGG16_CONV_LAYERS,
                       TINY: ("block1_conv1", schemas.GRADCAM_LAYER)}

IMAGENET = "imagenet"
NO_WEIGHTS = "none"

# The recipe's defaults, chosen by cross-validation on real BUSI images
# (training/README.md, "How the defaults were chosen").
LEARNING_RATE = 1e-3
DEFAULT_EPOCHS = 300  # the most the head stage runs; it stops early
# The fine-tune stage's settings are "auto" (None) by default, made concrete
# by `training.recipe.resolved`. Where bfloat16 runs fast (AMX or a GPU) the
# stage trains the whole base (its first layer on) for at most
# AUTO_FINE_TUNE_EPOCHS at WHOLE_BASE_LEARNING_RATE: 17 minutes for `train`
# on 2 cores with AMX, the best recipe measured on BUSI and the one that held
# up best under scanner-like shifts (training/README.md, "The whole base by
# default where bfloat16 is fast"). Where bfloat16 runs on AVX512-BF16 alone
# (no AMX: about a third of its speed) the stage trains block5 for at most
# AUTO_BLOCK5_FINE_TUNE_EPOCHS at FINE_TUNE_LEARNING_RATE instead ("Block5 by
# default with AVX512-BF16 alone"). Without bfloat16 no fine-tune runs unless
# asked for (float32 does not fit train's 20 minutes), and an asked-for one
# trains block5 at FINE_TUNE_LEARNING_RATE.
DEFAULT_FINE_TUNE_EPOCHS: Optional[int] = None
AUTO_FINE_TUNE_EPOCHS = 3  # the whole base
AUTO_BLOCK5_FINE_TUNE_EPOCHS = 5
FINE_TUNE_LEARNING_RATE = 1e-5  # block5 (or any part of the base)
WHOLE_BASE_LEARNING_RATE = 3e-5
DEFAULT_PATIENCE = 20  # epochs without a better validation loss
DEFAULT_AUGMENT_VIEWS = 7  # the mirror image + 6 random geometric views
# The views of each training image (training.recipe): as stored, its mirror,
# then random geometric views. With --degrade every second random view (3, 5,
# …) also gets scanner degradations; with --annotate any random view may
# carry synthetic marks. --augment_views N trains on views 1…N besides 0.
ORIGINAL_VIEW = 0  # the pixels as stored (and as scoring sees them)
MIRROR_VIEW = 1  # the horizontal mirror image
FIRST_RANDOM_VIEW = 2
FIRST_DEGRADED_VIEW = FIRST_RANDOM_VIEW + 1
# --depth (training.augment.deepen): each random view of an image, with this
# probability, scaled by a factor in this range from the top edge, on black.
DEPTH_PROBABILITY = 0.3
DEPTH_SCALE = (0.7, 0.95)
DEFAULT_VAL_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.0  # `cv` measures the recipe; train on the rest
DEFAULT_FOLDS = 5
DEFAULT_LABEL_SMOOTHING = 0.1
# Momentum of the exponential moving average of the weights every stage
# keeps (Keras' Adam use_ema); 0: none, the fitted weights themselves.
DEFAULT_EMA_MOMENTUM = 0.0
# The malignant class's balanced weight is multiplied by this: a missed
# cancer costs more than a benign lesion sent for review. On BUSI x2 buys
# about +0.04 malignant recall for about -0.04 benign recall at the same
# macro-F1 and AUC (training/README.md, "Malignant class weight").
DEFAULT_MALIGNANT_WEIGHT = 2.0
DEFAULT_NAME = "busi-vgg16"
# Arithmetic of training's frozen-base pass and fine-tune stage (the weights
# and the artifact stay float32): "auto" is bfloat16 where the hardware has
# bfloat16 instructions (training.model.resolve_precision), else float32.
AUTO = "auto"
FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
PRECISIONS = (AUTO, FLOAT32, BFLOAT16)
DEFAULT_OOD_TRANSFORM = schemas.OOD_TRANSFORM_SQRT_L2


def check_threshold_rule(rule: str) -> None:
  """--threshold_rule, as `train`, `cv` and `recalibrate` take it.

  Raises:
    ValueError: not one of schemas.THRESHOLD_RULES.
  """
  if rule not in schemas.THRESHOLD_RULES:
    raise ValueError(f"--threshold_rule {rule!r} is not one of"
                     f" {schemas.THRESHOLD_RULES}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What `python -m training train` was asked to do."""
  data: Tuple[str, ...]
  output: str
  image_size: Optional[int] = None  # None: the TFRecords' size
  # The backbone's input size (the model resizes to it); None: the
  # TFRecords' size, no resize. Not the default: at the same training time
  # 320 was no better on BUSI (training/README.md, "Network input size").
  network_size: Optional[int] = None
  backbone_weights: str = IMAGENET
  backbone: str = VGG16
  epochs: int = DEFAULT_EPOCHS
  fine_tune_epochs: Optional[int] = DEFAULT_FINE_TUNE_EPOCHS  # None: auto
  # The first base layer the fine-tune stage trains (it and every base layer
  # after it); None: auto (the whole base where bfloat16 is fast, else
  # block5's first layer).
  fine_tune_from: Optional[str] = None
  val_fraction: float = DEFAULT_VAL_FRACTION
  test_fraction: float = DEFAULT_TEST_FRACTION
  seed: int = 0
  threshold: float = schemas.DEFAULT_THRESHOLD
  batch_size: int = 32
  # Fixed views per training image besides the original (0: no
  # augmentation); their conv outputs are computed once.
  augment_views: int = DEFAULT_AUGMENT_VIEWS
  # Scanner degradations (blur, resolution, speckle, JPEG) on every second
  # random view (3, 5, 7, …): training/README.md, "Scanner degradations".
  degrade: bool = True
  # Synthetic burned-in annotations (calipers, dotted lines, text) on half
  # the random views of every class: training/README.md, "Burned-in
  # annotations".
  annotate: bool = True
  # Some random views framed as a deeper depth setting would show them
  # (smaller, from the top, on black): training/README.md, "Depth".
  depth: bool = True
  patience: int = DEFAULT_PATIENCE  # 0: no early stopping
  label_smoothing: float = DEFAULT_LABEL_SMOOTHING
  # The head stage (and the fine-tune, unless fine_tune_ema_momentum says
  # otherwise) validates, stops early on and keeps the moving average of its
  # weights over its steps instead of the weights themselves (0: off).
  ema_momentum: float = DEFAULT_EMA_MOMENTUM
  # The fine-tune stage's own momentum; None: auto, as ema_momentum (0: the
  # fine-tune keeps its raw weights while the head stage still averages).
  fine_tune_ema_momentum: Optional[float] = None
  malignant_weight: float = DEFAULT_MALIGNANT_WEIGHT  # x balanced weight
  # `train` cross-validates the recipe on its data first (0: not), so the
  # artifact carries out-of-fold figures: the conv outputs are shared, so
  # this costs k head fits (and k fine-tunes when fine-tuning). None: auto,
  # DEFAULT_FOLDS unless cv_report brings the figures or a fine-tune runs
  # that five more of would not fit train's budget: anything but a bfloat16
  # GPU or block5 in bfloat16 on AMX (`training.recipe.train_resolved`).
  cv_folds: Optional[int] = None
  # An earlier `python -m training cv` report (cv.json) of the same settings
  # and data: the artifact carries its figures instead of cross-validating
  # again.
  cv_report: Optional[str] = None
  # What a --target_accuracy threshold is chosen on (schemas.THRESHOLD_ON):
  # the validation split, or the out-of-fold predictions of the run's
  # cross-validation (cv_folds or cv_report).
  threshold_on: str = schemas.THRESHOLD_ON_VALIDATION
  name: str = DEFAULT_NAME
  learning_rate: float = LEARNING_RATE
  # None: auto, WHOLE_BASE_LEARNING_RATE when the whole base is fine-tuned,
  # else FINE_TUNE_LEARNING_RATE.
  fine_tune_learning_rate: Optional[float] = None
  # How the fine-tune stage's rate moves over its steps
  # (schemas.FINE_TUNE_SCHEDULES): held, or decayed to 0 along a cosine.
  fine_tune_schedule: str = schemas.FINE_TUNE_SCHEDULE_CONSTANT
  overwrite: bool = False
  calibrate: bool = True  # fit the temperature on the validation split
  # None: the fixed --threshold.
  target_accuracy: Optional[float] = schemas.DEFAULT_TARGET_ACCURACY
  # How the threshold chooser estimates the non-flagged images' accuracy
  # (schemas.THRESHOLD_RULES).
  threshold_rule: str = schemas.DEFAULT_THRESHOLD_RULE
  synthetic_data: bool = False  # phantoms: said in the model card
  # The out-of-distribution detector (busi_core.ood): features transform,
  # and the share of validation images its threshold lets pass (0: none).
  ood_transform: str = DEFAULT_OOD_TRANSFORM
  ood_pass_rate: float = schemas.DEFAULT_OOD_PASS_RATE
  # PRECISIONS; train and cv resolve "auto" before they start.
  precision: str = AUTO

  @property
  def fine_tune_rate(self) -> float:
    """--fine_tune_learning_rate, or its auto value: WHOLE_BASE_LEARNING_RATE
    when --fine_tune_from is the base's first layer, else
    FINE_TUNE_LEARNING_RATE."""
    if self.fine_tune_learning_rate is not None:
      return self.fine_tune_learning_rate
    whole = self.fine_tune_from == FINE_TUNABLE_LAYERS[self.backbone][0]
    return WHOLE_BASE_LEARNING_RATE if whole else FINE_TUNE_LEARNING_RATE

  @property
  def fine_tune_ema(self) -> float:
    """--fine_tune_ema_momentum, or its auto value: --ema_momentum."""
    if self.fine_tune_ema_momentum is not None:
      return self.fine_tune_ema_momentum
    return self.ema_momentum

  @property
  def augment(self) -> bool:
    return self.augment_views > 0

  def network_size_for(self, image_size: int) -> int:
    """The backbone's input size for images of `image_size`."""
    return self.network_size or image_size

  def validate(self, cross_validation: bool = False) -> None:
    """Raises ValueError naming the first bad flag.

    Args:
      cross_validation: checks for `cv` (no --output needed; the folds are
        the test sets, so --test_fraction must be 0).
    """
    if not self.data:
      raise ValueError("--data is required")
    if not self.output and not cross_validation:
      raise ValueError("--output is required")
    if cross_validation and self.test_fraction:
      raise ValueError("cv: each fold is the test set in turn; leave"
                       " --test_fraction at 0")
    if self.epochs < 1:
      raise ValueError("--epochs must be at least 1")
    if self.fine_tune_epochs is not None and self.fine_tune_epochs < 0:
      raise ValueError("--fine_tune_epochs must be 0 or more")
    if self.fine_tune_from is not None:
      if not self.fine_tune_epochs:
        raise ValueError(f"--fine_tune_from {self.fine_tune_from} needs"
                         " --fine_tune_epochs above 0 (no fine-tune stage"
                         " runs without it; auto may run none)")
      layers = FINE_TUNABLE_LAYERS.get(self.backbone, ())
      if self.fine_tune_from not in layers:
        raise ValueError(f"--fine_tune_from {self.fine_tune_from!r} is not a"
                         f" layer with weights of the {self.backbone} base;"
                         f" one of: {', '.join(layers)}")
    if self.precision not in PRECISIONS:
      raise ValueError(f"--training_precision {self.precision!r}: one of"
                       f" {', '.join(PRECISIONS)}")
    if self.augment_views < 0:
      raise ValueError("--augment_views must be 0 or more")
    if self.cv_folds is not None and (self.cv_folds == 1
                                      or self.cv_folds < 0):
      raise ValueError("--cv_folds must be 0 (none) or at least 2")
    if self.cv_report is not None:
      if cross_validation:
        raise ValueError("--cv_report is train's: cv writes a report")
      if self.cv_folds is not None:
        raise ValueError(f"--cv_report takes the cross-validated figures from"
                         f" {self.cv_report}; leave out --cv_folds"
                         f" {self.cv_folds}")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError("--label_smoothing must be in [0, 1)")
    for name, off in (("ema_momentum", "no weight averaging"),
                      ("fine_tune_ema_momentum", "none in the fine-tune")):
      value = getattr(self, name)
      if value is not None and not 0.0 <= value < 1.0:
        raise ValueError(f"--{name} {value} must be in [0, 1) (0: {off})")
    if not 0.0 < self.malignant_weight <= 100.0:
      raise ValueError(f"--malignant_weight {self.malignant_weight} must be"
                       " in (0, 100]")
    if self.patience < 0:
      raise ValueError("--patience must be 0 or more")
    if self.batch_size < 1:
      raise ValueError("--batch_size must be at least 1")
    if not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"--threshold {self.threshold} is outside [0, 1]")
    check_threshold_rule(self.threshold_rule)
    if self.threshold_on not in schemas.THRESHOLD_ON:
      raise ValueError(f"--threshold_on {self.threshold_on!r}: one of"
                       f" {', '.join(schemas.THRESHOLD_ON)}")
    if self.threshold_on == schemas.THRESHOLD_ON_CV:
      if cross_validation:
        raise ValueError("--threshold_on is train's: cv chooses each fold's"
                         " threshold on its validation split")
      if self.target_accuracy is None:
        raise ValueError(f"--threshold_on {self.threshold_on} chooses a"
                         " threshold for --target_accuracy; this one is"
                         " fixed")
      if self.cv_folds == 0 and not self.cv_report:
        raise ValueError("--threshold_on cv needs out-of-fold predictions:"
                         " --cv_folds N or --cv_report, not --cv_folds 0")
      if not self.calibrate:
        raise ValueError("--threshold_on cv takes the folds' calibrated"
                         " confidences for the final model's, which"
                         " --no_calibrate leaves uncalibrated")
    if self.target_accuracy is not None:
      if not 0.0 < self.target_accuracy <= 1.0:
        raise ValueError(
            f"--target_accuracy {self.target_accuracy} is outside (0, 1]")
      if self.val_fraction <= 0.0:
        raise ValueError("--target_accuracy chooses the threshold on the"
                         " validation split: --val_fraction must be above 0")
    if self.fine_tune_schedule not in schemas.FINE_TUNE_SCHEDULES:
      raise ValueError(f"--fine_tune_schedule {self.fine_tune_schedule!r}:"
                       f" one of {', '.join(schemas.FINE_TUNE_SCHEDULES)}")
    for name in ("learning_rate", "fine_tune_learning_rate"):
      value = getattr(self, name)
      if value is not None and not 0.0 < value <= 1.0:
        raise ValueError(f"--{name} {value} must be in (0, 1]")
    if self.image_size is not None and not 32 <= self.image_size <= 4096:
      raise ValueError(f"--image_size {self.image_size} is outside 32..4096"
                       " (VGG16 needs at least 32)")
    if self.network_size is not None and not 32 <= self.network_size <= 4096:
      raise ValueError(f"--network_size {self.network_size} is outside"
                       " 32..4096 (VGG16 needs at least 32)")
    for name in ("val_fraction", "test_fraction"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"--{name} must be in [0, 1)")
    if self.val_fraction + self.test_fraction >= 1.0:
      raise ValueError("--val_fraction + --test_fraction must be below 1")
    if self.ood_transform not in schemas.OOD_TRANSFORMS:
      raise ValueError(f"--ood_transform must be one of"
                       f" {schemas.OOD_TRANSFORMS}")
    if not 0.0 <= self.ood_pass_rate <= 1.0:
      raise ValueError(f"--ood_pass_rate {self.ood_pass_rate} is outside"
                       " [0, 1] (0: no out-of-distribution detector)")
    if self.backbone not in BACKBONES:
      raise ValueError(f"--backbone must be one of {BACKBONES}")
    if self.backbone != VGG16 and self.backbone_weights != NO_WEIGHTS:
      raise ValueError(f"--backbone {self.backbone} has no pretrained weights"
                       f" (--backbone_weights {self.backbone_weights});"
                       f" pass --backbone_weights {NO_WEIGHTS}")
    if not self.name or "/" in self.name:
      raise ValueError("--name must be non-empty and contain no '/'")
