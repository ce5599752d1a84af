"""Command line: `python -m training COMMAND FLAGS`, COMMAND one of train,
cv, evaluate, recalibrate, gradcam, phantoms."""

import argparse
import sys
from typing import List, Optional

import schemas
from busi_core import output_dirs, spelling
from schemas import evaluation as evaluation_schema
from training import config as config_lib

_WEIGHTS_HELP = (
    "imagenet (Keras' download; default), none (random init, for tests), or"
    " PATH of a Keras VGG16 notop .h5 (local or gs://), e.g."
    " vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 where there is no"
    " network.")


def _add_recipe_flags(parser: argparse.ArgumentParser) -> None:
  """The flags of the training recipe, shared by `train` and `cv`."""
  parser.add_argument("--data", action="append", required=True,
                      help="Glob of *.tfrecord.gz files; repeatable.")
  parser.add_argument("--image_size", type=int, default=None,
                      help="Must match the TFRecords; default: their size.")
  parser.add_argument(
      "--network_size", type=int, default=None,
      help="VGG16's input size: the model resizes the TFRecords' images to"
           " it (area interpolation) before the backbone. Default: their"
           " size, no resize. Training and scoring costs grow with its"
           " square.")
  parser.add_argument("--backbone_weights", default=config_lib.IMAGENET,
                      help=_WEIGHTS_HELP)
  parser.add_argument("--backbone", choices=config_lib.BACKBONES,
                      default=config_lib.VGG16,
                      help="vgg16, or tiny: a 2-conv stand-in for tests only.")
  parser.add_argument("--epochs", type=int, default=config_lib.DEFAULT_EPOCHS,
                      help="Most epochs of head training, base frozen"
                      " (default %(default)d; stops early, see --patience).")
  parser.add_argument("--fine_tune_epochs", type=_epochs_or_auto,
                      default=config_lib.DEFAULT_FINE_TUNE_EPOCHS,
                      help="Then at most this many epochs with base layers"
                      " unfrozen (see --fine_tune_from). Default auto:"
                      f" {config_lib.AUTO_FINE_TUNE_EPOCHS} where"
                      " --training_precision is bfloat16 on a CPU with AMX or"
                      " on a GPU (the whole base then fits train's 20 minutes"
                      f" on 2 cores), {config_lib.AUTO_BLOCK5_FINE_TUNE_EPOCHS}"
                      " (block5) where it is bfloat16 on AVX512-BF16 alone,"
                      " else 0 (float32 does not fit).")
  parser.add_argument("--fine_tune_from", default=None, metavar="LAYER",
                      help="First base layer the fine-tune stage trains, with"
                      " every base layer after it. Default auto: block1_conv1"
                      " (the whole base) where bfloat16 runs on AMX or a GPU,"
                      " else block5_conv1. Needs --fine_tune_epochs.")
  parser.add_argument("--patience", type=int,
                      default=config_lib.DEFAULT_PATIENCE,
                      help="Stop a stage after this many epochs without a"
                      " lower validation loss, keeping the best epoch's"
                      " weights (default %(default)d; 0: run every epoch).")
  parser.add_argument("--label_smoothing", type=float,
                      default=config_lib.DEFAULT_LABEL_SMOOTHING,
                      help="Share of each one-hot target spread over the"
                      " other classes (default %(default)g).")
  parser.add_argument("--ema_momentum", type=float,
                      default=config_lib.DEFAULT_EMA_MOMENTUM,
                      help="Keep an exponential moving average of each"
                      " stage's weights over its steps (Adam's use_ema) and"
                      " validate, stop early on and keep those averaged"
                      " weights; e.g. 0.99 averages over about 100 steps"
                      " (default %(default)g: off). The fine-tune stage"
                      " takes --fine_tune_ema_momentum where given.")
  parser.add_argument("--fine_tune_ema_momentum",
                      type=_or_auto(float, "a number"), default=None,
                      help="--ema_momentum for the fine-tune stage alone;"
                      " 0 averages the head stage only. Default auto: as"
                      " --ema_momentum.")
  parser.add_argument("--malignant_weight", type=float,
                      default=config_lib.DEFAULT_MALIGNANT_WEIGHT,
                      help="Multiplies the malignant class's balanced class"
                      " weight: more malignant recall for less benign recall"
                      " (default %(default)g; 1: plain balanced weights).")
  parser.add_argument("--learning_rate", type=float,
                      default=config_lib.LEARNING_RATE,
                      help="Adam learning rate of the head stage (default"
                      " %(default)g).")
  parser.add_argument("--fine_tune_learning_rate",
                      type=_or_auto(float, "a number"), default=None,
                      help="Adam learning rate of the fine-tune stage. Default"
                      " auto:"
                      f" {config_lib.WHOLE_BASE_LEARNING_RATE:g} when it"
                      " trains the whole base, else"
                      f" {config_lib.FINE_TUNE_LEARNING_RATE:g}.")
  parser.add_argument("--fine_tune_schedule",
                      choices=schemas.FINE_TUNE_SCHEDULES,
                      default=schemas.FINE_TUNE_SCHEDULE_CONSTANT,
                      help="The fine-tune stage's rate over its steps:"
                      f" {schemas.FINE_TUNE_SCHEDULE_CONSTANT} (held), or"
                      f" {schemas.FINE_TUNE_SCHEDULE_COSINE} (from"
                      " --fine_tune_learning_rate down to 0 over"
                      " --fine_tune_epochs; default %(default)s).")
  parser.add_argument("--val_fraction", type=float,
                      default=config_lib.DEFAULT_VAL_FRACTION,
                      help="Share held out to stop early, calibrate and"
                      " choose the threshold (default %(default)g).")
  parser.add_argument("--test_fraction", type=float,
                      default=config_lib.DEFAULT_TEST_FRACTION,
                      help="Share held out only to report (default"
                      " %(default)g: `cv` measures the recipe; in cv the"
                      " folds are the test sets and this must stay 0).")
  parser.add_argument("--seed", type=int, default=0,
                      help="Decides the split, initialisation and shuffling.")
  parser.add_argument("--threshold", type=float, default=None,
                      help="A fixed review threshold: confidence below it is"
                      " flagged. Given alone it replaces the chosen one;"
                      " with --target_accuracy it is only reported (default"
                      f" for that report: {schemas.DEFAULT_THRESHOLD:g}).")
  parser.add_argument("--target_accuracy", type=_target, default=None,
                      help="Choose the threshold on validation: the lowest"
                      " calibrated confidence at which the accuracy of the"
                      " images not flagged reaches this, as"
                      " --threshold_rule estimates it (default"
                      f" {schemas.DEFAULT_TARGET_ACCURACY:g} unless"
                      " --threshold is given; 'none' for the fixed"
                      " threshold).")
  parser.add_argument("--threshold_rule", choices=schemas.THRESHOLD_RULES,
                      default=None,
                      help="How the accuracy of the images not flagged is"
                      " estimated when the threshold is chosen for"
                      " --target_accuracy: their mean calibrated confidence"
                      " ('expected', the default: stable on a small"
                      " validation split) or the validation images' own"
                      " accuracy ('observed').")
  parser.add_argument("--no_calibrate", dest="calibrate",
                      action="store_false", default=True,
                      help="Keep temperature 1 (no temperature scaling on the"
                      " validation split).")
  parser.add_argument("--synthetic_data", action="store_true",
                      help="The data are synthetic phantoms: the model card"
                      " says so.")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument(
      "--training_precision", choices=config_lib.PRECISIONS,
      default=config_lib.AUTO,
      help="Arithmetic of the frozen-base pass and the fine-tune stage:"
      " bfloat16 (Keras mixed precision: float32 weights, bfloat16"
      " products; ~6x faster for VGG16 on CPUs with AMX) or float32. The"
      " artifact is float32 either way. Default auto: bfloat16 where the"
      " CPU has AMX-BF16 or AVX512-BF16 instructions or the GPU has"
      " bfloat16 tensor cores, else float32.")
  parser.add_argument(
      "--ood_pass_rate", type=float, default=schemas.DEFAULT_OOD_PASS_RATE,
      help="Out-of-distribution detector: its threshold lets this share of"
      " the validation images pass (default %(default)g; 0: no detector).")
  parser.add_argument(
      "--ood_transform", choices=schemas.OOD_TRANSFORMS,
      default=config_lib.DEFAULT_OOD_TRANSFORM,
      help="How the pooled features are transformed before the detector's"
      " Mahalanobis distance (default %(default)s).")
  parser.add_argument("--augment_views", type=int, default=None,
                      help="Fixed views of each training image besides the"
                      " original: its mirror image, then random rotation /"
                      " shift / zoom / flip (default"
                      f" {config_lib.DEFAULT_AUGMENT_VIEWS}). Their conv"
                      " outputs are computed once, so each costs one VGG16"
                      " pass per training image, not one per epoch.")
  augment = parser.add_mutually_exclusive_group()
  augment.add_argument(
      "--augment", dest="augment", action="store_true", default=None,
      help="Augment with --augment_views views (the default).")
  augment.add_argument(
      "--no_augment", dest="augment", action="store_false",
      help="No augmentation: the originals only (--augment_views 0).")
  degrade = parser.add_mutually_exclusive_group()
  degrade.add_argument(
      "--degrade", dest="degrade", action="store_true", default=None,
      help="Add scanner degradations (random blur, lower resolution,"
      " speckle, JPEG; no brightness change) to every second random view:"
      f" views {config_lib.FIRST_DEGRADED_VIEW},"
      f" {config_lib.FIRST_DEGRADED_VIEW + 2},"
      f" {config_lib.FIRST_DEGRADED_VIEW + 4}, ... (the default).")
  degrade.add_argument(
      "--no_degrade", dest="degrade", action="store_false",
      help="Random views are geometry only.")
  annotate = parser.add_mutually_exclusive_group()
  annotate.add_argument(
      "--annotate", dest="annotate", action="store_true", default=None,
      help="Draw synthetic burned-in annotations (calipers, dotted"
      " measurement lines, text) on about half the random views of every"
      " class, so that marks stop telling lesions from normal tissue (the"
      " default).")
  annotate.add_argument(
      "--no_annotate", dest="annotate", action="store_false",
      help="No synthetic annotations on the views.")
  depth = parser.add_mutually_exclusive_group()
  depth.add_argument(
      "--depth", dest="depth", action="store_true", default=None,
      help="Show each random view of an image, with probability"
      f" {config_lib.DEPTH_PROBABILITY:g}, as a deeper depth setting would:"
      f" scaled by {config_lib.DEPTH_SCALE[0]:g}-{config_lib.DEPTH_SCALE[1]:g}"
      " from the top edge, on black (the default).")
  depth.add_argument(
      "--no_depth", dest="depth", action="store_false",
      help="No depth changes on the views.")


_NONE = "none"


def _or_auto(convert, words: str):
  """A flag's type: "auto" (None), or `convert(value)`, else `words`."""
  def parse(value: str):
    if value.lower() == config_lib.AUTO:
      return None
    try:
      return convert(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{value!r}: {words}, or auto"
                                       ) from None
  return parse


_epochs_or_auto = _or_auto(int, "a whole number of epochs")


def _target(value: str):
  return _NONE if value.lower() == _NONE else float(value)


def _recalibration_rule(args: argparse.Namespace) -> str:
  if args.threshold_rule is not None and args.threshold is not None:
    raise ValueError(f"--threshold_rule {args.threshold_rule} chooses a"
                     " threshold; --threshold fixes it")
  return args.threshold_rule or schemas.DEFAULT_THRESHOLD_RULE


def _recipe_config(args: argparse.Namespace, **fields
                  ) -> config_lib.TrainConfig:
  """The TrainConfig the recipe flags ask for (plus `fields`)."""
  target = args.target_accuracy
  if target is None:
    # An explicit --threshold alone means a fixed threshold.
    target = (None if args.threshold is not None else
              schemas.DEFAULT_TARGET_ACCURACY)
  elif target == _NONE:
    target = None
  if args.threshold_rule is not None and target is None:
    raise ValueError(f"--threshold_rule {args.threshold_rule} needs a"
                     " threshold chosen for --target_accuracy; this one is"
                     " fixed")
  if (args.threshold_rule == schemas.THRESHOLD_RULE_EXPECTED
      and not args.calibrate):
    raise ValueError("--threshold_rule expected reads calibrated"
                     " confidences as the accuracy they predict;"
                     " --no_calibrate leaves them uncalibrated")
  views = args.augment_views
  if args.augment is False:
    if views:
      raise ValueError(f"--no_augment contradicts --augment_views {views}")
    views = 0
  elif views is None:
    views = config_lib.DEFAULT_AUGMENT_VIEWS
  elif args.augment and not views:
    raise ValueError("--augment contradicts --augment_views 0")
  # Asked for explicitly, each needs the views it works on.
  for flag, asked, first, step, which, what in (
      ("--degrade", args.degrade, config_lib.FIRST_DEGRADED_VIEW, 2, "views",
       "are the degraded ones"),
      ("--annotate", args.annotate, config_lib.FIRST_RANDOM_VIEW, 1,
       "the random views", "carry the marks"),
      ("--depth", args.depth, config_lib.FIRST_RANDOM_VIEW, 1,
       "the random views", "are the ones deepened")):
    if asked and views < first:
      raise ValueError(f"{flag} needs --augment_views {first} or more"
                       f" ({which} {first}, {first + step}, ... {what});"
                       f" got {views}")
  # Default: on wherever there are random views to draw them on.
  degrade = args.degrade is not False
  annotate = args.annotate is not False
  depth = args.depth is not False
  return config_lib.TrainConfig(
      data=tuple(args.data), image_size=args.image_size,
      network_size=args.network_size,
      backbone_weights=args.backbone_weights, backbone=args.backbone,
      epochs=args.epochs, fine_tune_epochs=args.fine_tune_epochs,
      fine_tune_from=args.fine_tune_from,
      patience=args.patience, label_smoothing=args.label_smoothing,
      ema_momentum=args.ema_momentum,
      fine_tune_ema_momentum=args.fine_tune_ema_momentum,
      malignant_weight=args.malignant_weight,
      val_fraction=args.val_fraction, test_fraction=args.test_fraction,
      seed=args.seed,
      threshold=(schemas.DEFAULT_THRESHOLD if args.threshold is None
                 else args.threshold),
      batch_size=args.batch_size, augment_views=views, degrade=degrade,
      annotate=annotate, depth=depth,
      learning_rate=args.learning_rate,
      fine_tune_learning_rate=args.fine_tune_learning_rate,
      fine_tune_schedule=args.fine_tune_schedule,
      calibrate=args.calibrate, target_accuracy=target,
      threshold_rule=args.threshold_rule or schemas.DEFAULT_THRESHOLD_RULE,
      synthetic_data=args.synthetic_data, ood_pass_rate=args.ood_pass_rate,
      ood_transform=args.ood_transform, precision=args.training_precision,
      **fields)


# The --masks flag of `evaluate` and `cv`: what it reads.
_MASKS_HELP = ("Glob of BUSI archives (zip, tar, tar.gz) holding the lesion"
               " masks (x_mask.png, x_mask_1.png beside x.png), or a folder"
               " or glob of the mask files themselves; repeatable.")


def _parser() -> argparse.ArgumentParser:
  # No abbreviations: `--fold 3` for `--folds` would pass silently, and a
  # later flag starting the same way would change what it means.
  parser = argparse.ArgumentParser(
      prog="python -m training", allow_abbrev=False,
      description="Train the BUSI classifier from preprocessed TFRecords,"
      " cross-validate its recipe, evaluate or recalibrate a trained"
      " artifact, or explain one image with Grad-CAM.")
  parser.add_argument(
      "--version", action="version",
      version=f"busi-scoring {schemas.PACKAGE_VERSION} (artifact format"
      f" {schemas.ARTIFACT_FORMAT_VERSION})")
  commands = parser.add_subparsers(dest="command", required=True)

  train = commands.add_parser(
      "train", allow_abbrev=False,
      help="TFRecords → model artifact directory.",
      description="Trains VGG16 (frozen base + head, optional base"
      " fine-tuning) on the labelled examples of the TFRecords written by"
      " `python -m beam_pipeline preprocess` and writes the artifact that"
      " scoring loads.")
  train.add_argument("--output", required=True,
                     help="Artifact directory to write (local or gs://).")
  _add_recipe_flags(train)
  train.add_argument("--cv_folds", type=_or_auto(int, "a number of folds"),
                     default=None,
                     help="First cross-validate the recipe on the data with"
                     " this many grouped folds, sharing the conv outputs, so"
                     " the model card has out-of-fold figures (0: skip)."
                     f" Default auto: {config_lib.DEFAULT_FOLDS}, but 0 where"
                     " five more fine-tunes would not fit train's 20 minutes"
                     " on 2 cores: any fine-tune except on a bfloat16 GPU or"
                     " block5 in bfloat16 on AMX (see --cv_report).")
  train.add_argument("--cv_report", default=None, metavar="CV_JSON",
                     help="cv.json of an earlier `python -m training cv` run"
                     " with the same flags on the same images (checked):"
                     " the model card carries its cross-validated figures and"
                     " train runs no folds of its own.")
  train.add_argument("--threshold_on", choices=schemas.THRESHOLD_ON,
                     default=schemas.THRESHOLD_ON_VALIDATION,
                     help="What --target_accuracy's threshold is chosen on:"
                     " the validation split (default), or the out-of-fold"
                     " predictions of the cross-validation (cv: needs"
                     " --cv_folds, or --cv_report with its"
                     " cv_predictions.parquet): every image, not the"
                     " validation share.")
  train.add_argument("--name", default=config_lib.DEFAULT_NAME,
                     help="Prefix of the model_version.")
  train.add_argument("--overwrite", action="store_true",
                     help="Replace an artifact already in --output.")

  cross = commands.add_parser(
      "cv", allow_abbrev=False,
      help="Cross-validate the training recipe on labelled TFRecords.",
      description="Grouped, stratified k-fold cross-validation of the whole"
      " recipe `train` runs with the same flags: each fold in turn is scored"
      " by a model trained, calibrated and thresholded on the other folds."
      " Near-duplicate images never straddle folds. Prints a table and"
      " writes cv.json.")
  cross.add_argument("--folds", type=int, default=config_lib.DEFAULT_FOLDS,
                     help="Number of folds (default %(default)d).")
  cross.add_argument("--output", default=None,
                     help="Directory for cv.json (local or gs://); default:"
                     " print only.")
  cross.add_argument("--overwrite", action="store_true",
                     help="Replace a cv report already in --output.")
  cross.add_argument(
      "--masks", action="append", default=[],
      help=_MASKS_HELP + " Checks each fold's model against the masks of the"
      " images it did not train on: the Grad-CAM pointing game and IoU, as"
      " `evaluate --masks`, out of fold.")
  _add_recipe_flags(cross)

  evaluate = commands.add_parser(
      "evaluate", allow_abbrev=False,
      help="Metrics of an artifact on labelled TFRecords.")
  evaluate.add_argument("--model", required=True,
                        help="Artifact directory written by train.")
  evaluate.add_argument("--data", action="append", required=True,
                        help="Glob of *.tfrecord.gz files; repeatable.")
  evaluate.add_argument("--output", required=True,
                        help="Report directory: metrics.json,"
                        " confusion_matrix.png and"
                        " evaluation_predictions.parquet (one row per image).")
  evaluate.add_argument("--batch_size", type=int, default=32)
  evaluate.add_argument(
      "--masks", action="append", default=[],
      help=_MASKS_HELP + " Adds the Grad-CAM pointing game and IoU against"
      " them to metrics.json, and each image's to the predictions.")
  evaluate.add_argument(
      "--ood", action="append", default=[],
      help="Glob of *.tfrecord.gz of images that are NOT breast ultrasound"
      " (other modalities, photographs, documents; labels not needed);"
      " repeatable. Adds how many the OOD detector catches to metrics.json.")
  evaluate.add_argument("--overwrite", action="store_true",
                        help="Replace a report already in --output.")

  explain = commands.add_parser(
      "gradcam", allow_abbrev=False,
      help="Grad-CAM overlay of one image file.",
      description="Decodes and resizes the image exactly as the pipeline"
      " does, prints the artifact's probabilities, and writes the Grad-CAM"
      " overlay (block5_conv3) for the predicted or the given class.")
  explain.add_argument("--model", required=True,
                       help="Artifact directory written by train.")
  explain.add_argument("--image", required=True,
                       help="Image file (PNG, JPEG, ...; local or gs://).")
  explain.add_argument("--output", required=True,
                       help="PNG to write (local or gs://): a *.png name,"
                       " not the --image nor inside the --model artifact.")
  explain.add_argument("--class", dest="class_name", default=None,
                       help="Class to explain; default: the predicted one.")
  explain.add_argument("--overwrite", action="store_true",
                       help="Replace an existing --output file.")

  recal = commands.add_parser(
      "recalibrate", allow_abbrev=False,
      help="Refit temperature and threshold for a new site.",
      description="Refits an artifact's temperature and review threshold on"
      " a labelled sample from another hospital or scanner (TFRecords of"
      " `python -m beam_pipeline preprocess`), keeping every weight, and"
      " writes them as a new artifact. The sample is split (near-duplicates"
      " kept together) into a part to fit on and a held-out part on which"
      " the parent's and the new calibration are compared.")
  recal.add_argument("--model", required=True,
                     help="The artifact to recalibrate (only read).")
  recal.add_argument("--data", action="append", required=True,
                     help="Glob of the sample's *.tfrecord.gz; repeatable.")
  recal.add_argument("--output", required=True,
                     help="New artifact directory (local or gs://), not"
                     " --model.")
  recal_threshold = recal.add_mutually_exclusive_group()
  recal_threshold.add_argument(
      "--target_accuracy", type=float, default=None,
      help="Choose the threshold as the lowest confidence at which the"
      " accuracy of the fit part's images not flagged reaches this, as"
      " --threshold_rule estimates it (default"
      f" {schemas.DEFAULT_TARGET_ACCURACY:g}).")
  recal_threshold.add_argument(
      "--threshold", type=float, default=None,
      help="A fixed threshold instead of one chosen on the sample.")
  recal.add_argument(
      "--threshold_rule", choices=schemas.THRESHOLD_RULES, default=None,
      help="How the chosen threshold estimates the accuracy of the images"
      " not flagged: their mean calibrated confidence ('expected', the"
      " default) or the fit part's own accuracy ('observed').")
  recal.add_argument("--holdout_fraction", type=float,
                     default=schemas.DEFAULT_HOLDOUT_FRACTION,
                     help="Share of the sample held out to report on"
                     " (default %(default)g); 0 fits on all of it and reports"
                     " in-sample figures.")
  recal.add_argument("--seed", type=int, default=0,
                     help="Decides the fit / held-out split.")
  recal.add_argument("--name", default=None,
                     help="Prefix of the new model_version (default: the"
                     " parent's name).")
  recal.add_argument("--batch_size", type=int, default=32)
  recal.add_argument("--overwrite", action="store_true",
                     help="Replace an artifact already in --output.")

  phantom = commands.add_parser(
      "phantoms", allow_abbrev=False,
      help="Write a BUSI-layout zip of synthetic phantom frames.")
  phantom.add_argument("--output", required=True, help="The .zip to write.")
  phantom.add_argument("--per_class", type=int, default=50,
                       help="Images of each class.")
  phantom.add_argument("--size", type=int, default=500)
  phantom.add_argument("--seed", type=int, default=0)
  phantom.add_argument("--no_masks", dest="with_masks", action="store_false",
                       default=True)
  return parser


def _refuse_unknown_flags(parser: argparse.ArgumentParser,
                          argv: List[str]) -> None:
  """A flag the command does not take ends the run first, naming the
  closest it does take: argparse would report a missing required flag
  before it (`--ouptut` for `--output`), or the top-level usage after."""
  if not argv or argv[0].startswith("-"):
    return
  commands = next(a for a in parser._actions  # pylint: disable=protected-access
                  if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access
  command = commands.choices.get(argv[0])
  if command is None:
    return
  spelling.refuse_unknown_flags(command, argv[1:])


def main(argv: Optional[List[str]] = None) -> int:
  """Runs one command; returns the process exit status.

  0 on success, 2 for bad flags, data, weights or artifacts (with a message
  on stderr saying what to pass instead).
  """
  parser = _parser()
  _refuse_unknown_flags(parser, sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  try:
    if args.command == "train":
      from training import train  # pylint: disable=import-outside-toplevel
      config = _recipe_config(args, output=args.output, name=args.name,
                              overwrite=args.overwrite,
                              cv_folds=args.cv_folds,
                              cv_report=args.cv_report,
                              threshold_on=args.threshold_on)
      config.validate()
      for line in train.flag_warnings(config):
        print(line)
      print(train.format_summary(train.train(config)))
    elif args.command == "cv":
      from training import cv  # pylint: disable=import-outside-toplevel
      if args.output:
        output_dirs.check_report_dir(args.output, schemas.CV_REPORT_FILE,
                                     args.overwrite, "cv")
      report = cv.cross_validate(_recipe_config(args, output=args.output or ""),
                                 args.folds, args.masks)
      print(cv.format_table(report))
      if args.output:
        print(f"Report written to {cv.write_report(report, args.output)}")
    elif args.command == "evaluate":
      from training import evaluate, lesions, metrics  # pylint: disable=import-outside-toplevel
      output_dirs.check_report_dir(args.output, evaluate.REPORT_FILE,
                                   args.overwrite, "evaluate")
      report = evaluate.evaluate(args.model, args.data, args.output,
                                 args.batch_size, args.masks, args.ood)
      print(metrics.format_report(report))
      flagging = report["flagging"]
      print(f"ECE {report['ece']:.3f} (15 bins) at temperature"
            f" {report['temperature']:.4f}; threshold"
            f" {report['threshold']:.4f} flags {flagging['flagged']} of"
            f" {flagging['count']}; accuracy "
            + ("n/a" if flagging["accuracy_confident"] is None else
               f"{flagging['accuracy_confident']:.3f}")
            + " on the rest")
      print(evaluate.auc_line(report))
      if report["seen_in_training"] or report["near_duplicates_of_training"]:
        print(f"Optimistic: {report['seen_in_training']} of these images were"
              " in the model's training or validation split, and"
              f" {report['near_duplicates_of_training'] or 0} more are"
              " near-duplicates of images there.")
      recalibration_fit = report[schemas.COLUMN_IN_RECALIBRATION_FIT]
      if recalibration_fit:
        print(f"In-sample calibration: {recalibration_fit} of these images"
              " (or near-duplicates of them) are in the sample recalibrate"
              " fitted the temperature and threshold on: ECE and flagging"
              " on them are optimistic.")
      elif recalibration_fit is None:
        print("Recalibrated, but which of these images its calibration was"
              " fitted on is unknown (the warning above says why): ECE and"
              " flagging may be in-sample.")
      for line in evaluate.not_fitted_on_lines(report):
        print(line)
      for line in evaluate.ood_lines(report):
        print(line)
      if evaluation_schema.LESION_LOCALISATION in report:
        print(lesions.format_localisation(
            evaluation_schema.LesionLocalisation.from_json(
                report[evaluation_schema.LESION_LOCALISATION])))
      for warning in report[evaluation_schema.WARNINGS]:
        print(f"WARNING: {warning}")
      print(f"Report written to {args.output}")
    elif args.command == "recalibrate":
      from training import recalibrate  # pylint: disable=import-outside-toplevel
      metadata = recalibrate.recalibrate(recalibrate.RecalibrateConfig(
          model=args.model, data=tuple(args.data), output=args.output,
          target_accuracy=args.target_accuracy, threshold=args.threshold,
          threshold_rule=_recalibration_rule(args),
          holdout_fraction=args.holdout_fraction, seed=args.seed,
          name=args.name, overwrite=args.overwrite,
          batch_size=args.batch_size))
      print(recalibrate.format_summary(metadata, args.output))
    elif args.command == "gradcam":
      from training import explain  # pylint: disable=import-outside-toplevel
      result = explain.explain_file(args.model, args.image, args.output,
                                    args.class_name, args.overwrite)
      print(explain.format_result(result))
    else:
      from training import phantoms  # pylint: disable=import-outside-toplevel
      names = phantoms.write_phantom_archive(
          args.output, {label: args.per_class for label in schemas.LABELS},
          args.size, args.seed, args.with_masks)
      print(f"Wrote {len(names)} members to {args.output}")
  except ValueError as e:
    # ArtifactError and BackboneWeightsError are ValueErrors too.
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
