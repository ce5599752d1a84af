"""`evaluate`: a saved artifact's metrics on any labelled TFRecords."""

import datetime
import json
import logging
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

import schemas
from schemas import artifact as artifact_schema
from schemas import evaluation as evaluation_schema
from training import calibration, data as data_lib, metrics
from busi_core import artifact, inference, ood
from training import lesion_masks, lesions, plots, split

_LOG = logging.getLogger(__name__)

REPORT_FILE = "metrics.json"
CONFUSION_MATRIX_FILE = artifact_schema.CONFUSION_MATRIX_FILE
SPLIT_FILE = artifact_schema.SPLIT_FILE  # written by train; flags seen images
# Written by recalibrate: flags the images its calibration was fitted on.
RECALIBRATION_SPLIT_FILE = artifact_schema.RECALIBRATION_SPLIT_FILE
_RECALIBRATION_FIT = artifact_schema.RECALIBRATION_FIT


def _join(directory: str, name: str) -> str:
  return FileSystems.join(directory.rstrip("/"), name)


class _Fitted(NamedTuple):
  """Images a model or its calibration was fitted on (split.json's train +
  val, or recalibration_split.json's fit part): ids, and dHashes if known."""
  ids: set
  hashes: Optional[List[int]]


def _fitted_on(model_dir: str) -> Optional[_Fitted]:
  uri = _join(model_dir, SPLIT_FILE)
  if not FileSystems.exists(uri):
    return None
  with FileSystems.open(uri) as f:
    splits = json.loads(f.read().decode("utf-8"))
  names = (split.TRAIN, split.VAL)
  ids = set().union(*(splits.get(name, []) for name in names))
  stored = splits.get(artifact_schema.SPLIT_DHASH_KEY)
  hashes = None if stored is None else [
      int(h, 16) for name in names for h in stored.get(name, [])]
  return _Fitted(ids, hashes)


def _recalibrated_on(model_dir: str, metadata) -> Tuple[Optional[_Fitted],
                                                       Optional[str]]:
  """The part of a site sample `recalibrate` fitted the artifact's temperature
  and threshold on, from its recalibration_split.json.

  Returns:
    (the fit part, None); (an empty one, None) for an artifact that was never
    recalibrated (a recalibration_split.json beside it is another artifact's
    and is ignored); (None, why) when the artifact was recalibrated but its
    file is missing, unreadable, lacks the fit part's dHashes, or does not
    match the metadata's fingerprint of the fit part: not the file
    `recalibrate` wrote for it.
  """
  block = metadata.recalibration
  if block is None:
    return _Fitted(set(), []), None
  uri = _join(model_dir, RECALIBRATION_SPLIT_FILE)
  if not FileSystems.exists(uri):
    return None, f"{RECALIBRATION_SPLIT_FILE} is missing"
  try:
    with FileSystems.open(uri) as f:
      parts = json.loads(f.read().decode("utf-8"))
    ids = list(parts[_RECALIBRATION_FIT])
    hashes = [int(h, 16) for h in
              parts[artifact_schema.SPLIT_DHASH_KEY][_RECALIBRATION_FIT]]
  except (ValueError, KeyError, TypeError) as e:
    return None, (f"{RECALIBRATION_SPLIT_FILE} cannot be read as"
                  f" recalibrate writes it ({type(e).__name__}: {e})")
  expected = (block.data_fingerprint or {}).get(_RECALIBRATION_FIT)
  if (expected is None or split.fingerprint(ids) != expected or
      len(hashes) != len(ids)):
    return None, (f"{RECALIBRATION_SPLIT_FILE} does not match the"
                  " metadata's fingerprint of the fit part")
  return _Fitted(set(ids), hashes), None


def _in_fit(fitted: Optional[_Fitted], image_ids: Sequence[str],
            hashes: Sequence[int]) -> Optional[np.ndarray]:
  """Per image: is it, or a near-duplicate of it, in `fitted`? (None:
  unknown.) `_seen`'s two flags as one."""
  exact, near = _seen(fitted, image_ids, hashes)
  return exact if near is None else exact | near


def in_training(model_dir: str, image_ids: Sequence[str],
                images: np.ndarray) -> Optional[np.ndarray]:
  """Per image: was it, or a near-duplicate of it, in the training or
  validation split the artifact's weights were fitted on? None: the
  artifact does not say (no split.json)."""
  return _in_fit(_fitted_on(model_dir), image_ids,
                 [split.dhash(image) for image in images])


def _seen(fitted: Optional[_Fitted], image_ids: Sequence[str],
          hashes: Sequence[int]
         ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
  """Per image: (an exact copy of a training/validation image, else a
  near-duplicate of one), as bool arrays; `hashes` are the images' dHashes.

  None where the artifact does not say (no split.json, or one written
  before dHashes were stored).
  """
  if fitted is None:
    return None, None
  exact = np.array([i in fitted.ids for i in image_ids], bool)
  if fitted.hashes is None:
    return exact, None
  near = np.array(split.near_any(hashes, fitted.hashes), bool)
  return exact, near & ~exact


def _figures(truth: np.ndarray, probabilities: np.ndarray, threshold: float,
             labels: Sequence[str]) -> Dict:
  """What the artifact's outputs score on these images: the
  `metrics.classification_report` fields, "ece" and "reliability" (15 bins),
  "flagging" at `threshold` (`calibration.flag_stats`), and the AUC of
  p_malignant against the rest ("auc_malignant", as `cv` reports it) and
  against benign images alone ("auc_malignant_vs_benign": normal images
  left out, the question a site with benign/malignant scans asks); an AUC
  is null where either side has no image."""
  predicted = probabilities.argmax(axis=1)
  confidence = _confidence(probabilities)
  correct = predicted == truth
  report = metrics.classification_report(truth, predicted, labels)
  reliability = calibration.reliability(confidence, correct)
  report.update({"ece": reliability["ece"], "reliability": reliability,
                 "flagging": calibration.flag_stats(confidence, correct,
                                                    threshold)})
  names = list(labels)
  malignant = (names.index(schemas.MALIGNANT) if schemas.MALIGNANT in names
               else None)
  benign = names.index(schemas.BENIGN) if schemas.BENIGN in names else None
  report["auc_malignant"] = report["auc_malignant_vs_benign"] = None
  if malignant is not None:
    scores = probabilities[:, malignant].astype(np.float64)
    report["auc_malignant"] = metrics.roc_auc(scores, truth == malignant)
    if benign is not None:
      lesion = (truth == malignant) | (truth == benign)
      report["auc_malignant_vs_benign"] = metrics.roc_auc(
          scores[lesion], truth[lesion] == malignant)
  return report


def _not_fitted_on(flags: Sequence[Optional[np.ndarray]],
                   truth: np.ndarray, probabilities: np.ndarray,
                   threshold: float, labels: Sequence[str]
                  ) -> Optional[Dict]:
  """`_figures` over the images none of `flags` marks (a flag that is None,
  unknown, marks none): schemas.evaluation NOT_FITTED_ON."""
  fitted = np.zeros(len(truth), bool)
  for marked in flags:
    if marked is not None:
      fitted |= marked
  if not fitted.any():
    return None
  keep = ~fitted
  block = {"count": int(keep.sum()), "excluded": int(fitted.sum()),
           "status_unknown": any(marked is None for marked in flags)}
  if keep.any():
    block.update(_figures(truth[keep], probabilities[keep], threshold,
                          labels))
  return block


def _count(flags: Optional[np.ndarray]) -> Optional[int]:
  return None if flags is None else int(flags.sum())


def _confidence(probabilities: np.ndarray) -> np.ndarray:
  """Each image's top probability, in float64: scoring compares it with the
  threshold as a Python float (numpy would compare a float32 array in
  float32, so a probability of float32(0.9) would not be under 0.9)."""
  return probabilities.max(axis=1).astype(np.float64)


def _predictions_table(data: data_lib.LabelledData, labels: Sequence[str],
                       probabilities: np.ndarray, threshold: float,
                       ood_scores: Optional[np.ndarray],
                       ood_flags: Optional[np.ndarray], model_version: str,
                       seen: Optional[np.ndarray],
                       near: Optional[np.ndarray],
                       recalibration_fit: Optional[np.ndarray]) -> pa.Table:
  """Every evaluated image as the artifact scored it
  (schemas.evaluation_predictions_schema, without the lesion columns)."""
  count = len(data.image_ids)

  def nullable(values, kind):
    return pa.nulls(count, kind) if values is None else values

  predicted = probabilities.argmax(axis=1)
  confidence = _confidence(probabilities)
  columns = {
      schemas.COLUMN_IMAGE_ID: list(data.image_ids),
      schemas.COLUMN_SOURCE: list(data.sources),
      schemas.COLUMN_LABEL: [labels[i] for i in data.labels],
      schemas.COLUMN_PREDICTED_CLASS: [labels[i] for i in predicted],
  }
  for i, name in enumerate(labels):
    columns[schemas.probability_column(name)] = probabilities[:, i].astype(
        np.float64)
  columns.update({
      schemas.COLUMN_CONFIDENCE: confidence,
      schemas.COLUMN_THRESHOLD: np.full(count, threshold, np.float64),
      schemas.COLUMN_LOW_CONFIDENCE: confidence < threshold,
      schemas.COLUMN_OOD_SCORE: nullable(ood_scores, pa.float64()),
      schemas.COLUMN_OUT_OF_DISTRIBUTION: nullable(ood_flags, pa.bool_()),
      schemas.COLUMN_MODEL_VERSION: [model_version] * count,
      schemas.COLUMN_SEEN_IN_TRAINING: nullable(seen, pa.bool_()),
      schemas.COLUMN_NEAR_DUPLICATE_OF_TRAINING: nullable(near, pa.bool_()),
      schemas.COLUMN_IN_RECALIBRATION_FIT: nullable(recalibration_fit,
                                                    pa.bool_()),
  })
  return pa.table(columns,
                  schema=schemas.evaluation_predictions_schema(labels))


def _score(model: inference.ScoringModel, images: np.ndarray,
           batch_size: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """(probabilities [n, classes], OOD scores [n] or None): scoring's own
  forward pass (`busi_core.inference.predict`), a batch at a time."""
  outputs: List[inference.ModelOutput] = []
  for start in range(0, len(images), batch_size):
    outputs += inference.predict(model, images[start:start + batch_size])
  classes = int(model.network.outputs[0].shape[-1])
  probabilities = (np.stack([o.probabilities for o in outputs]) if outputs
                   else np.zeros((0, classes), np.float32))
  if model.ood is None:
    return probabilities, None
  return probabilities, np.array([o.ood_score for o in outputs], np.float64)


def _ood_block(model: inference.ScoringModel,
               flagged: Optional[np.ndarray]) -> Optional[Dict]:
  """What the detector flags of these (in-distribution) images."""
  if flagged is None:
    return None
  return {"threshold": model.ood.threshold, "count": int(len(flagged)),
          "flagged": int(flagged.sum()),
          "flagged_share": float(flagged.mean()) if len(flagged) else None}


def evaluate_ood_archive(model: inference.ScoringModel,
                         patterns: Sequence[str], batch_size: int,
                         listed: int = 20) -> Dict:
  """How many images of TFRecords known to be out of distribution (not
  breast ultrasound) the detector catches; labels are not needed.

  Returns:
    {"data", "count", "caught", "caught_share", "threshold", "missed": the
    sources of up to `listed` images it let through, highest score first}.
  """
  records = list(data_lib.read_records(data_lib.list_files(patterns)))
  if not records:
    raise ValueError(f"--ood {list(patterns)} holds no image")
  images = np.stack([r.pixels for r in records])
  size = int(model.network.inputs[0].shape[1])
  if images.shape[1:3] != (size, size):
    raise ValueError(f"--ood images are {images.shape[1]}x{images.shape[2]},"
                     f" the model takes {size}x{size}: preprocess them with"
                     f" --image_size {size}")
  _, scores = _score(model, images, batch_size)
  caught = ood.flagged(model.ood, scores)
  missed = [i for i in np.argsort(-scores) if not caught[i]][:listed]
  return {"data": list(patterns), "count": int(len(records)),
          "caught": int(caught.sum()),
          "caught_share": float(caught.mean()),
          "threshold": model.ood.threshold,
          "missed": [{"source": records[i].source,
                      "ood_score": float(scores[i])} for i in missed]}


def evaluate(model_dir: str, patterns: Sequence[str], output: str,
             batch_size: int = 32, masks: Sequence[str] = (),
             ood_patterns: Sequence[str] = ()) -> Dict:
  """Scores labelled TFRecords with an artifact; writes metrics and a plot.

  Args:
    model_dir: the artifact (local or gs://).
    patterns: globs of gzip TFRecords; unlabelled examples are skipped.
    output: report directory (local or gs://); gets metrics.json,
      confusion_matrix.png and evaluation_predictions.parquet (each image as
      the artifact scored it: schemas.evaluation_predictions_schema).
    batch_size: images per model call.
    masks: globs of BUSI archives holding the lesion masks; when given, the
      report gets a `lesion_localisation` block (`lesions.localise_each`):
      Grad-CAM of the benign/malignant images checked against their masks;
      and the predictions each image's pointing-game hit and IoU.
    ood_patterns: globs of TFRecords of images that are not breast
      ultrasound: the report's "ood_archive" block says how many the
      artifact's OOD detector catches (`evaluate_ood_archive`).

  Returns:
    The report written to metrics.json: the `metrics.classification_report`
    fields, the ECE (15 bins) and what the artifact's threshold flags
    (`calibration.flag_stats`), plus provenance: model_version, data
    fingerprint, skip counts, and how many of the images the model was
    trained or validated on, as exact copies or near-duplicates, when known;
    how many are (or are near-duplicates of) images a recalibration fitted
    its temperature and threshold on ("in_recalibration_fit": 0 when the
    artifact was never recalibrated, null when that is unknown), and the
    figures over the rest ("not_fitted_on", null when nothing was excluded);
    the AUCs of p_malignant against the rest and against benign images
    ("auc_malignant", "auc_malignant_vs_benign");
    "ood": what the OOD detector flags of these images (null without a
    detector), and "ood_archive" with --ood; "warnings"
    (schemas.evaluation.WARNINGS): the artifact's training and
    recalibration warnings, and one when it predicts one class for every
    image though they hold several, else one for each class they hold at
    least `metrics.NEVER_PREDICTED_MIN_SUPPORT` of that it never predicts.

  Raises:
    artifact.ArtifactError: the artifact is invalid.
    ValueError: no file matches or no labelled image is found, or a
      --masks archive cannot be read, or batch_size is under 1.
  """
  if batch_size < 1:
    raise ValueError("--batch_size must be at least 1")
  loaded = artifact.load_artifact(model_dir)
  if ood_patterns and loaded.ood is None:
    raise ValueError(f"--ood: {model_dir} has no out-of-distribution detector"
                     " (retrain it with this release)")
  scoring_model = inference.scoring_model(loaded.model, loaded.ood)
  labels = loaded.labels
  size = loaded.metadata.image_size
  data, stats = data_lib.load_labelled(patterns, labels, size,
                                       model_size=True)
  # Before the model runs, so that a bad --masks fails at once.
  mask_sets = lesion_masks.read_mask_archives(masks) if masks else None
  _LOG.info("Evaluating %s on %d labelled images (%d unlabelled skipped)",
            loaded.metadata.model_version, stats.used, stats.unlabelled)
  probabilities, ood_scores = _score(scoring_model, data.images, batch_size)
  predicted = probabilities.argmax(axis=1)
  threshold = float(loaded.metadata.threshold)
  report = _figures(data.labels, probabilities, threshold, labels)
  confidence = _confidence(probabilities)
  hashes = [split.dhash(image) for image in data.images]
  seen, near = _seen(_fitted_on(model_dir), data.image_ids, hashes)
  recalibrated_on, unknown_why = _recalibrated_on(model_dir, loaded.metadata)
  if unknown_why:
    _LOG.warning("%s was recalibrated, but %s: which of these images its"
                 " calibration was fitted on is unknown", model_dir,
                 unknown_why)
  recalibration_fit = _in_fit(recalibrated_on, data.image_ids, hashes)
  ood_flags = (None if ood_scores is None else
               ood.flagged(scoring_model.ood, ood_scores))
  table = _predictions_table(data, labels, probabilities, threshold,
                             ood_scores, ood_flags,
                             loaded.metadata.model_version, seen, near,
                             recalibration_fit)
  report.update({
      "model_dir": model_dir,
      "model_version": loaded.metadata.model_version,
      "threshold": threshold,
      "low_confidence": int((confidence < threshold).sum()),
      # With the artifact's (calibrated) probabilities, as scoring sees them.
      "temperature": float(loaded.metadata.temperature),
      "data": list(patterns),
      "data_fingerprint": split.fingerprint(data.image_ids),
      "examples_read": stats.examples,
      "unlabelled_skipped": stats.unlabelled,
      "unknown_label_skipped": stats.unknown_label,
      "duplicates_skipped": stats.duplicates,
      "conflicting_labels_skipped": stats.conflicting,
      # Images the model was trained or validated on: the same bytes, and
      # other near-duplicates (dHash within split.DEFAULT_MAX_DISTANCE bits:
      # the same frame re-encoded, resized or slightly changed).
      "seen_in_training": _count(seen),
      "near_duplicates_of_training": _count(near),
      # Images (or near-duplicates of images) the temperature was fitted and
      # the threshold chosen on by `recalibrate`: ECE and flagging on them
      # are in-sample. 0 for an artifact never recalibrated.
      schemas.COLUMN_IN_RECALIBRATION_FIT: _count(recalibration_fit),
      evaluation_schema.NOT_FITTED_ON: _not_fitted_on(
          (seen, near, recalibration_fit), data.labels, probabilities,
          threshold, labels),
      "ood": _ood_block(scoring_model, ood_flags),
      "evaluated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "package_version": schemas.PACKAGE_VERSION,
  })
  if mask_sets is not None:
    block, each = lesions.localise_each(
        loaded.model, data.images, data.sources, data.labels, predicted,
        labels, mask_sets, batch_size)
    report[evaluation_schema.LESION_LOCALISATION] = block.to_json()
    table = lesions.with_columns(
        table, each.by_image(data.image_ids),
        schemas.evaluation_predictions_schema(labels, localised=True))
  if ood_patterns:
    report["ood_archive"] = evaluate_ood_archive(scoring_model, ood_patterns,
                                                 batch_size)
  report[evaluation_schema.WARNINGS] = _warnings(loaded.metadata, predicted,
                                                 data.labels, labels)
  for warning in report[evaluation_schema.WARNINGS]:
    _LOG.warning(warning)
  if report["seen_in_training"] or report["near_duplicates_of_training"]:
    _LOG.warning("%d of the %d images were in the model's training or"
                 " validation split and %d more are near-duplicates of images"
                 " there: these metrics are optimistic",
                 report["seen_in_training"] or 0, report["count"],
                 report["near_duplicates_of_training"] or 0)
  if report[schemas.COLUMN_IN_RECALIBRATION_FIT]:
    _LOG.warning("%d of the %d images (or near-duplicates of them) are in the"
                 " sample `recalibrate` fitted this artifact's temperature"
                 " and threshold on: its ECE and flagging figures are"
                 " in-sample", report[schemas.COLUMN_IN_RECALIBRATION_FIT],
                 report["count"])
  if "://" not in output:
    os.makedirs(output, exist_ok=True)
  # The rows first: a report must not stand beside another run's rows.
  with FileSystems.create(_join(output, evaluation_schema.PREDICTIONS_FILE)
                          ) as f:
    pq.write_table(table, f)
  with FileSystems.create(_join(output, REPORT_FILE)) as f:
    f.write(json.dumps(report, indent=2).encode("utf-8"))
  plots.plot_confusion_matrix(
      report["confusion_matrix"], labels, _join(output, CONFUSION_MATRIX_FILE),
      f"{report['model_version']} ({report['count']} images)")
  return report


def _warnings(metadata, predicted: np.ndarray, truth: np.ndarray,
              labels: Sequence[str]) -> List[str]:
  """The artifact's training and recalibration warnings, and whether it
  predicts one class for every evaluated image (`metrics.one_class`), else a
  class it should and never does (`metrics.never_predicted`)."""
  return (artifact.model_warning_lines(metadata)
          + site_warnings("evaluated", predicted, truth, labels,
                          metadata.warnings == ()))


# What site_warnings' sentences end with, in evaluate's words.
CANNOT_RECALIBRATE = (
    "`recalibrate` cannot fix that: it refits only the temperature and the"
    " threshold, which change no predicted class; retrain, or fine-tune on"
    " images like these.")


def site_warnings(name: str, predicted: np.ndarray, truth: np.ndarray,
                  labels: Sequence[str], told_apart: bool,
                  figures: str = "here",
                  tail: str = CANNOT_RECALIBRATE) -> List[str]:
  """Whether a model predicts one class for every image of a labelled
  sample that holds several (`metrics.one_class`), else which classes it
  should and never predicts (`metrics.never_predicted`): sentences for
  `evaluate` and `recalibrate`, each saying why recalibration cannot fix
  it.

  Args:
    name: what the images are, e.g. "evaluated".
    told_apart: train's checks ran on the artifact and found nothing (its
      metadata's `warnings` is empty): each sentence then says these
      images probably differ from its own.
    figures: where the figures the one-class sentence speaks of are
      ("its figures here are those of a constant answer").
    tail: the sentence each ends with: why recalibration cannot fix it.
  """
  one_class, sentences = metrics.prediction_findings(
      name, predicted, truth, labels,
      f"on these images it tells nothing apart, and its figures {figures}"
      " are those of a constant answer",
      "on these images it does not recognise that class")
  if told_apart:
    checks = ("It told its training's validation (or test) images apart"
              if one_class else "Its training's checks found no class it"
              " never predicted on its validation (or test) images")
    sentences = [f"{s} {checks}, so these probably differ from them"
                 " (scanner, preset, preprocessing)." for s in sentences]
  return [f"{s[0].upper()}{s[1:]} {tail}" for s in sentences]


def not_fitted_on_lines(report: Dict) -> List[str]:
  """The figures over the images the artifact was not fitted on, for a
  terminal (nothing when it was fitted on none of them)."""
  block = report.get(evaluation_schema.NOT_FITTED_ON)
  if block is None:
    return []
  lines = [f"Not fitted on: {block['count']} of the"
           f" {block['count'] + block['excluded']} images (neither they nor"
           " near-duplicates of them were in",
           "  its training or validation split or its recalibration's fit"
           " part" + ("; where the artifact could not tell, counted as not"
                      " fitted on)" if block["status_unknown"] else ")")
           + (":" if block["count"] else ": no figures.")]
  if not block["count"]:
    return lines
  flagging = block["flagging"]
  rest = flagging["accuracy_confident"]
  malignant = block["per_class"].get(schemas.MALIGNANT)
  return lines + [
      f"  accuracy {block['accuracy']:.3f}, macro-F1"
      f" {block['macro']['f1']:.3f}, malignant recall "
      + (f"{malignant['recall']:.3f}" if malignant and malignant["support"]
         else "n/a") + f", ECE {block['ece']:.3f};",
      f"  threshold flags {flagging['flagged']} of {flagging['count']},"
      " accuracy " + ("n/a" if rest is None else f"{rest:.3f}")
      + " on the rest; " + auc_line(block)]


def auc_line(figures: Dict) -> str:
  """The two AUCs of p_malignant in `_figures`' output, for a terminal."""
  def auc(value):
    return "n/a" if value is None else f"{value:.3f}"
  return (f"AUC of p_malignant: {auc(figures['auc_malignant'])} against the"
          f" rest, {auc(figures['auc_malignant_vs_benign'])} against benign"
          " images alone")


def ood_lines(report: Dict) -> List[str]:
  """The OOD part of an evaluate report, for a terminal."""
  block = report.get("ood")
  if block is None:
    return ["OOD: the artifact has no out-of-distribution detector."]
  lines = [f"OOD threshold {block['threshold']:.3f} flags {block['flagged']}"
           f" of these {block['count']} images as out of distribution"]
  archive = report.get("ood_archive")
  if archive:
    lines.append(f"OOD archive: {archive['caught']} of {archive['count']}"
                 f" images caught ({100 * archive['caught_share']:.1f} %)")
    for miss in archive["missed"][:5]:
      lines.append(f"  missed: {miss['source']} (score"
                   f" {miss['ood_score']:.3f})")
  return lines
