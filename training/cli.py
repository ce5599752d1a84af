"""Command line: `python -m training COMMAND FLAGS`, COMMAND one of train,
evaluate, gradcam, recalibrate, phantoms."""

import argparse
import sys
from typing import List, Optional

import schemas
from schemas import evaluation as evaluation_schema
from training import config as config_lib

_WEIGHTS_HELP = (
    "imagenet (Keras' download; default), none (random init, for tests), or"
    " PATH of a Keras VGG16 notop .h5 (local or gs://), e.g."
    " vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 where there is no"
    " network.")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m training",
      description="Train the BUSI classifier from preprocessed TFRecords,"
      " evaluate a trained artifact, or explain one image with Grad-CAM.")
  commands = parser.add_subparsers(dest="command", required=True)

  train = commands.add_parser(
      "train", help="TFRecords → model artifact directory.",
      description="Trains VGG16 (frozen base + head, optional block5"
      " fine-tuning) on the labelled examples of the TFRecords written by"
      " `python -m beam_pipeline preprocess` and writes the artifact that"
      " scoring loads.")
  train.add_argument("--data", action="append", required=True,
                     help="Glob of *.tfrecord.gz files; repeatable.")
  train.add_argument("--output", required=True,
                     help="Artifact directory to write (local or gs://).")
  train.add_argument("--image_size", type=int, default=None,
                     help="Must match the TFRecords; default: their size.")
  train.add_argument("--backbone_weights", default=config_lib.IMAGENET,
                     help=_WEIGHTS_HELP)
  train.add_argument("--backbone", choices=config_lib.BACKBONES,
                     default=config_lib.VGG16,
                     help="vgg16, or tiny: a 2-conv stand-in for tests only.")
  train.add_argument("--epochs", type=int, default=config_lib.DEFAULT_EPOCHS,
                     help="Epochs of head training (base frozen).")
  train.add_argument("--fine_tune_epochs", type=int, default=0,
                     help="Then epochs with block5 unfrozen.")
  train.add_argument("--learning_rate", type=float,
                     default=config_lib.LEARNING_RATE,
                     help="Adam learning rate of the head stage (default"
                     " %(default)g, the recipe for pretrained weights).")
  train.add_argument("--fine_tune_learning_rate", type=float,
                     default=config_lib.FINE_TUNE_LEARNING_RATE,
                     help="Adam learning rate of the fine-tune stage (default"
                     " %(default)g).")
  train.add_argument("--val_fraction", type=float, default=0.15)
  train.add_argument("--test_fraction", type=float, default=0.15)
  train.add_argument("--seed", type=int, default=0,
                     help="Decides the split, initialisation and shuffling.")
  train.add_argument("--threshold", type=float,
                     default=schemas.DEFAULT_THRESHOLD,
                     help="Confidence below which scoring flags a prediction"
                     " (default %(default)g); with --target_accuracy only"
                     " reported for comparison.")
  train.add_argument("--target_accuracy", type=float, default=None,
                     help="Choose the threshold instead: the lowest"
                     " validation confidence at which the validation accuracy"
                     " of the images not flagged reaches this (after"
                     " calibration). If none does, the highest validation"
                     " confidence is used and a warning printed.")
  train.add_argument("--no_calibrate", dest="calibrate", action="store_false",
                     default=True,
                     help="Keep temperature 1 (no temperature scaling on the"
                     " validation split).")
  train.add_argument("--synthetic_data", action="store_true",
                     help="The data are synthetic phantoms: the model card"
                     " says so.")
  train.add_argument("--batch_size", type=int, default=32)
  augment = train.add_mutually_exclusive_group()
  augment.add_argument(
      "--augment", dest="augment", action="store_true", default=True,
      help="Random rotation/shift/shear/zoom/flip each epoch (default). Costs"
      " a VGG16 pass per training image per epoch.")
  augment.add_argument(
      "--no_augment", dest="augment", action="store_false",
      help="No augmentation: base features are computed once, so each epoch"
      " takes milliseconds.")
  train.add_argument("--name", default=config_lib.DEFAULT_NAME,
                     help="Prefix of the model_version.")
  train.add_argument("--overwrite", action="store_true",
                     help="Replace an artifact already in --output.")

  evaluate = commands.add_parser(
      "evaluate", help="Metrics of an artifact on labelled TFRecords.")
  evaluate.add_argument("--model", required=True,
                        help="Artifact directory written by train.")
  evaluate.add_argument("--data", action="append", required=True,
                        help="Glob of *.tfrecord.gz files; repeatable.")
  evaluate.add_argument("--output", required=True,
                        help="Report directory: metrics.json and"
                        " confusion_matrix.png.")
  evaluate.add_argument("--batch_size", type=int, default=32)
  evaluate.add_argument(
      "--masks", action="append", default=[],
      help="Glob of BUSI archives (zip, tar, tar.gz) holding the lesion masks"
      " (x_mask.png, x_mask_1.png beside x.png); repeatable. Adds the"
      " Grad-CAM pointing game and IoU against them to metrics.json.")

  explain = commands.add_parser(
      "gradcam", help="Grad-CAM overlay of one image file.",
      description="Decodes and resizes the image exactly as the pipeline"
      " does, prints the artifact's probabilities, and writes the Grad-CAM"
      " overlay (block5_conv3) for the predicted or the given class.")
  explain.add_argument("--model", required=True,
                       help="Artifact directory written by train.")
  explain.add_argument("--image", required=True,
                       help="Image file (PNG, JPEG, ...; local or gs://).")
  explain.add_argument("--output", required=True,
                       help="PNG to write (local or gs://).")
  explain.add_argument("--class", dest="class_name", default=None,
                       help="Class to explain; default: the predicted one.")

  recal = commands.add_parser(
      "recalibrate", help="Refit temperature and threshold for a new site.",
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
      " accuracy of the fit part's images not flagged reaches this (default"
      f" {schemas.DEFAULT_TARGET_ACCURACY:g}).")
  recal_threshold.add_argument(
      "--threshold", type=float, default=None,
      help="A fixed threshold instead of one chosen on the sample.")
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
      "phantoms", help="Write a BUSI-layout zip of synthetic phantom frames.")
  phantom.add_argument("--output", required=True, help="The .zip to write.")
  phantom.add_argument("--per_class", type=int, default=50,
                       help="Images of each class.")
  phantom.add_argument("--size", type=int, default=500)
  phantom.add_argument("--seed", type=int, default=0)
  phantom.add_argument("--no_masks", dest="with_masks", action="store_false",
                       default=True)
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  """Runs one command; returns the process exit status.

  0 on success, 2 for bad flags, data, weights or artifacts (with a message
  on stderr saying what to pass instead).
  """
  args = _parser().parse_args(argv)
  try:
    if args.command == "train":
      from training import train  # pylint: disable=import-outside-toplevel
      train.train(config_lib.TrainConfig(
          data=tuple(args.data), output=args.output,
          image_size=args.image_size,
          backbone_weights=args.backbone_weights, backbone=args.backbone,
          epochs=args.epochs, fine_tune_epochs=args.fine_tune_epochs,
          val_fraction=args.val_fraction, test_fraction=args.test_fraction,
          seed=args.seed, threshold=args.threshold,
          batch_size=args.batch_size, augment=args.augment, name=args.name,
          learning_rate=args.learning_rate,
          fine_tune_learning_rate=args.fine_tune_learning_rate,
          overwrite=args.overwrite, calibrate=args.calibrate,
          target_accuracy=args.target_accuracy,
          synthetic_data=args.synthetic_data))
    elif args.command == "evaluate":
      from training import evaluate, lesions, metrics  # pylint: disable=import-outside-toplevel
      report = evaluate.evaluate(args.model, args.data, args.output,
                                 args.batch_size, args.masks)
      print(metrics.format_report(report))
      flagging = report["flagging"]
      print(f"ECE {report['ece']:.3f} (15 bins) at temperature"
            f" {report['temperature']:.4f}; threshold"
            f" {report['threshold']:.4f} flags {flagging['flagged']} of"
            f" {flagging['count']}; accuracy "
            + ("n/a" if flagging["accuracy_confident"] is None else
               f"{flagging['accuracy_confident']:.3f}")
            + " on the rest")
      if report["seen_in_training"] or report["near_duplicates_of_training"]:
        print(f"Optimistic: {report['seen_in_training']} of these images were"
              " in the model's training or validation split, and"
              f" {report['near_duplicates_of_training'] or 0} more are"
              " near-duplicates of images there.")
      if evaluation_schema.LESION_LOCALISATION in report:
        print(lesions.format_localisation(
            evaluation_schema.LesionLocalisation.from_json(
                report[evaluation_schema.LESION_LOCALISATION])))
      print(f"Report written to {args.output}")
    elif args.command == "recalibrate":
      from training import recalibrate  # pylint: disable=import-outside-toplevel
      metadata = recalibrate.recalibrate(recalibrate.RecalibrateConfig(
          model=args.model, data=tuple(args.data), output=args.output,
          target_accuracy=args.target_accuracy, threshold=args.threshold,
          holdout_fraction=args.holdout_fraction, seed=args.seed,
          name=args.name, overwrite=args.overwrite,
          batch_size=args.batch_size))
      print(recalibrate.format_summary(metadata, args.output))
    elif args.command == "gradcam":
      from training import explain  # pylint: disable=import-outside-toplevel
      result = explain.explain_file(args.model, args.image, args.output,
                                    args.class_name)
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
