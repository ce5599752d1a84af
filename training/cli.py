"""Command line: `python -m training {train,evaluate,phantoms} FLAGS`."""

import argparse
import sys
from typing import List, Optional

import schemas
from training import config as config_lib

_WEIGHTS_HELP = (
    "imagenet (Keras' download; default), none (random init, for tests), or"
    " PATH of a Keras VGG16 notop .h5 (local or gs://), e.g."
    " vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 where there is no"
    " network.")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m training",
      description="Train the BUSI classifier from preprocessed TFRecords, or"
      " evaluate a trained artifact.")
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
                     help="Then epochs with block5 unfrozen at lr 1e-5.")
  train.add_argument("--val_fraction", type=float, default=0.15)
  train.add_argument("--test_fraction", type=float, default=0.15)
  train.add_argument("--seed", type=int, default=0,
                     help="Decides the split, initialisation and shuffling.")
  train.add_argument("--threshold", type=float,
                     default=schemas.DEFAULT_THRESHOLD,
                     help="Confidence below which scoring flags a prediction.")
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
          overwrite=args.overwrite))
    elif args.command == "evaluate":
      from training import evaluate, metrics  # pylint: disable=import-outside-toplevel
      report = evaluate.evaluate(args.model, args.data, args.output,
                                 args.batch_size)
      print(metrics.format_report(report))
      print(f"Report written to {args.output}")
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
