"""MODEL_CARD.md: what a model is for, what it was trained on, how good and
how calibrated it is, and what to distrust — rendered from metadata.json.

`render(metadata)` is a pure function of the metadata record (no
TensorFlow), so the card can never disagree with the numbers scoring reads;
`save_artifact` writes it into every artifact. Fields an artifact lacks are
shown as "n/a".
"""

import math
from typing import Any, List, Optional, Sequence

import schemas
from schemas import artifact as artifact_schema
from schemas import evaluation as evaluation_schema
from schemas import metadata as metadata_schema
from schemas.metadata import ArtifactMetadata

NA = "n/a"


def _num(value: Any, digits: int = 3) -> str:
  if value is None or isinstance(value, bool):
    return NA
  if isinstance(value, int):
    return str(value)
  try:
    return f"{float(value):.{digits}f}"
  except (TypeError, ValueError):
    return NA


def _pct(value: Any) -> str:
  if value is None or isinstance(value, bool):
    return NA
  try:
    return f"{100 * float(value):.1f} %"
  except (TypeError, ValueError):
    return NA


def _input_row(metadata: ArtifactMetadata) -> str:
  size = metadata.image_size
  row = (f"raw uint8 RGB {size}×{size} (resized by"
         " `busi_core.imaging.decode_and_resize`)")
  network = metadata.network_size
  if network and network != size:
    row += (f"; the model resizes it to {network}×{network} (area"
            " interpolation) for the backbone")
  return row


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
  def cell(value):
    return str(value).replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return lines


def wilson_interval(proportion: float, n: int, z: float = 1.96):
  """95 % Wilson score interval of a proportion observed on n trials."""
  if n <= 0:
    return 0.0, 1.0
  centre = proportion + z * z / (2 * n)
  spread = z * math.sqrt(proportion * (1 - proportion) / n + z * z /
                         (4 * n * n))
  scale = 1 + z * z / n
  return max(0.0, (centre - spread) / scale), min(1.0,
                                                  (centre + spread) / scale)


def weights_provenance(weights_source: Any) -> str:
  """A sentence on where the backbone's weights came from."""
  source = str(weights_source)
  if source == "imagenet":
    return ("ImageNet-pretrained VGG16 (notop) weights as downloaded by"
            " `keras.applications.VGG16(weights=\"imagenet\")`.")
  if source == "none":
    return ("None: the backbone was randomly initialised (no pretrained"
            " weights). Such a model is for tests and demos only.")
  if "@sha256:" in source:
    name, digest = source.split("@sha256:", 1)
    return (f"Local Keras weights file `{name}`, sha256 `{digest}` (VGG16"
            " notop; ImageNet-pretrained if it is Keras' standard file).")
  return f"`{source}`"


def _or_na(value: Any) -> Any:
  return NA if value is None else value


def _schedule(training: metadata_schema.TrainingSettings) -> str:
  """How the fine-tune's rate moved, after it in the card: nothing when
  held (or not recorded, as before the field)."""
  if training.fine_tune_schedule == schemas.FINE_TUNE_SCHEDULE_COSINE:
    return " (cosine decay towards 0 over the fine-tune's epochs)"
  return ""


def _ema(training: metadata_schema.TrainingSettings) -> str:
  """The weight averaging row: off where none ran (or not recorded, as
  before the field); each stage's where they differ."""
  head = training.ema_momentum or 0.0
  fine_tune = training.fine_tune_ema_momentum
  if fine_tune is None or fine_tune == head:
    if not head:
      return "off"
    return f"{head:g} (every stage keeps its averaged weights)"
  return (f"head stage {f'{head:g}' if head else 'off'}, fine-tune stage"
          f" {f'{fine_tune:g}' if fine_tune else 'off'}")


def _training(metadata: ArtifactMetadata) -> metadata_schema.TrainingSettings:
  return metadata.training or metadata_schema.TrainingSettings()


def _header(metadata: ArtifactMetadata) -> List[str]:
  lines = [f"# Model card: {metadata.model_version}", ""]
  if metadata.is_test_artifact:
    lines += ["> **UNTRAINED TEST ARTIFACT.** Random weights, trained on no"
              " data, written by `training.testing.make_test_artifact` for"
              " software tests. Its predictions mean nothing; never use it on"
              " images of patients.", ""]
  if metadata.is_synthetic:
    lines += ["> **TRAINED ON SYNTHETIC PHANTOMS**, not on patient images"
              " (`python -m training phantoms` or similar). It demonstrates"
              " the software only and says nothing about real ultrasound.",
              ""]
  lines += _banners("training", metadata.warnings)
  lines += _banners("recalibration, on the site sample",
                    metadata.recalibration_warnings)
  lines += _table(["field", "value"], [
      ["model_version", metadata.model_version],
      ["created_at", metadata.created_at],
      ["classes (output order)", ", ".join(metadata.labels) or NA],
      ["input", _input_row(metadata)],
      ["backbone", metadata.backbone],
      ["backbone weights", weights_provenance(metadata.weights_source)],
      ["temperature", _num(metadata.temperature)],
      ["review threshold", f"{_num(metadata.threshold, 4)}"
                           f" ({_threshold_source(metadata)})"],
      ["artifact format_version", metadata.format_version],
      ["package_version", metadata.package_version],
      ["seed", _or_na(_training(metadata).seed)],
  ])
  return lines + [""]


_INTENDED_USE = """\
## Intended use

- **Decision support for trained readers** of breast ultrasound
  (radiologists, breast sonographers): a second opinion on one 2-D B-mode
  frame, as probabilities for normal / benign / malignant, a Grad-CAM
  overlay of where the evidence lies, and a flag when the confidence is below
  the review threshold.
- **Not a diagnosis**, and not a substitute for the reader, histology or the
  clinical work-up. **Not for screening decisions on its own**: a "normal" or
  "benign" output must never by itself clear a patient, nor a "malignant" one
  by itself send her to biopsy.
- Validated only retrospectively, on held-out parts of its own training
  data (cross-validation folds and, if kept, a test split; below); not
  prospectively, and not on other centres, scanners,
  presets or populations. Expect worse and differently calibrated results
  there; measure before relying on it
  (`python -m training evaluate --model DIR --data ...`).
- Labels are the dataset's folder names; "normal" means no lesion in that
  frame, not a normal patient.
"""


def _threshold_source(metadata: ArtifactMetadata) -> str:
  return metadata.threshold_source or schemas.THRESHOLD_FIXED


def _data_section(metadata: ArtifactMetadata) -> List[str]:
  lines = ["## Training data", ""]
  if metadata.is_test_artifact:
    lines += ["None: this artifact was never trained.", ""]
  fingerprint = metadata.data_fingerprint
  counts = metadata.class_counts
  labels = list(metadata.labels)
  lines.append("Data fingerprint (sha256 over the sorted image_ids of each"
               " split; `overall` over all):")
  lines.append("")
  lines += _table(["split", "fingerprint"],
                  [[k, f"`{v}`"] for k, v in fingerprint.items()] or
                  [[NA, NA]])
  lines.append("")
  if counts:
    rows = []
    for name, per_class in counts.items():
      per_class = per_class or {}
      rows.append([name] + [per_class.get(l, 0) for l in labels] +
                  [sum(per_class.get(l, 0) for l in labels)])
    total = [sum(r[i + 1] for r in rows) for i in range(len(labels) + 1)]
    rows.append(["**all**"] + total)
    lines += ["Images per class and split:", ""]
    lines += _table(["split"] + labels + ["total"], rows)
    lines.append("")
  training = _training(metadata)
  skips = [("examples read", training.examples_read),
           ("unlabelled, skipped", training.unlabelled_skipped),
           ("exact duplicates (same bytes), used once",
            training.duplicates_skipped),
           ("same bytes under two classes, dropped",
            training.conflicting_labels_skipped),
           ("images in a near-duplicate group (kept in one split)",
            training.near_duplicates_grouped)]
  if any(count is not None for _, count in skips):
    lines += _table(["reading", "images"],
                    [[name, _or_na(count)] for name, count in skips])
    lines.append("")
  return lines


def _cross_validated(metadata: ArtifactMetadata) -> bool:
  return bool(metadata.cross_validation and metadata.cross_validation.summary)


# Where neither a test split nor cross-validation measured the artifact.
_NO_HELD_OUT = ("This artifact has no held-out figures (no test split, and"
                " no cross-validation): run `python -m training cv` with the"
                " same flags (and `train --cv_report` its cv.json), or"
                " `python -m training evaluate` on labelled images it has not"
                " seen, before trusting it.")


def _metrics_section(metadata: ArtifactMetadata) -> List[str]:
  report = metadata.test_metrics
  lines = [f"## Metrics (test split, {report.count or 0} images)", ""]
  if not report.count:
    if not _cross_validated(metadata):
      return lines + ["No test images. " + _NO_HELD_OUT, ""]
    return lines + ["No test images: no test split (the default:"
                    " cross-validation measures the recipe, and the model"
                    " learns from the rest)."
                    " Held-out figures: \"Cross-validated figures\" above.",
                    ""]
  macro = report.macro or metadata_schema.Scores()
  low, high = wilson_interval(report.accuracy or 0.0, report.count)
  lines += [f"Accuracy **{_num(report.accuracy)}** (95 % Wilson"
            f" interval {low:.3f}–{high:.3f} for {report.count} images);"
            f" macro precision {_num(macro.precision)}, recall"
            f" {_num(macro.recall)}, F1 {_num(macro.f1)}."
            " The test split influenced neither training, calibration nor"
            " the threshold.", ""]
  rows = [[label, _num(row.precision), _num(row.recall), _num(row.f1),
           _or_na(row.support)]
          for label, row in (report.per_class or {}).items()]
  lines += _table(["class", "precision", "recall", "F1", "support"], rows)
  labels = list(report.labels or ())
  matrix = report.confusion_matrix or ()
  if matrix:
    lines += ["", "Confusion matrix (rows: true class, columns: predicted):",
              ""]
    lines += _table(["true \\ predicted"] + labels,
                    [[label] + list(row) for label, row in zip(labels,
                                                               matrix)])
  return lines + [""]


_CV_ROWS = (
    ("macro F1", "macro_f1"), ("recall, malignant", "recall_malignant"),
    ("recall, benign", "recall_benign"), ("recall, normal", "recall_normal"),
    ("accuracy", "accuracy"), ("ECE (15 bins, calibrated)", "ece"),
    ("AUC, malignant vs rest", "auc_malignant"),
    ("flagged at the chosen threshold", "flagged_share"),
    ("accuracy, not flagged", "accuracy_unflagged"),
    ("accuracy, flagged", "accuracy_flagged"),
    ("flagged at the fixed threshold", "fixed_flagged_share"),
    ("accuracy, not flagged at the fixed threshold",
     "fixed_accuracy_unflagged"),
    ("out of distribution (in-distribution images flagged)",
     "ood_flagged_share"))
_SHARES = ("flagged_share", "fixed_flagged_share", "ood_flagged_share")


def _cv_localisation(block) -> List[str]:
  """Where the fold models looked, from `cv --masks` (a LesionLocalisation)."""
  o = block.overall

  def rates(s):
    return (f"pointing game {_num(s.pointing_hit_rate)}, IoU"
            f" {_num(s.mean_iou)}")

  classes = "; ".join(f"{label} {rates(s)} ({s.paired} images)"
                      for label, s in block.per_class.items())
  return [
      f"Where the fold models looked (`cv --masks`): Grad-CAM"
      f" ({block.layer}) of each held-out benign and malignant image's true"
      f" class against its lesion masks, {o.paired} of {o.images} images"
      f" paired: {rates(o)}; {classes}. The pointing game counts an image"
      " when the heatmap's peak lies in the lesion; IoU is that of the"
      f" heatmap above {_num(block.heatmap_threshold, 1)} of its peak with"
      " the lesion. Out of fold, as the figures above.", ""]


def _banners(source: str, warnings: Optional[Sequence[str]]) -> List[str]:
  """A quoted, bold WARNING line per warning, naming where it came from."""
  lines = []
  for warning in warnings or ():
    lines += [f"> **WARNING (from {source}):** {warning}", ""]
  return lines


def _cv_section(metadata: ArtifactMetadata) -> List[str]:
  """The recipe's cross-validated figures on the training data."""
  report = metadata.cross_validation
  lines = ["## Cross-validated figures (held-out folds of the training data)",
           ""]
  if not report:
    return lines + [
        "Not measured for this artifact (`--cv_folds 0`, or auto where"
        " five more fine-tunes like this one would not fit train's 20"
        " minutes: the whole base on a CPU, or block5 without AMX or a"
        " bfloat16 GPU). Run `python -m training cv --data"
        " GLOB` with the same flags to know how the recipe does on images"
        " it has not seen; `train --cv_report CV_JSON` then puts its"
        " figures on the card of a model trained with those flags.", ""]
  pooled = report.pooled or {}
  fixed = pooled.get("fixed_threshold")
  lines += _banners("cross-validation", report.warnings)
  if metadata.recalibration:
    lines += ["> Recalibrated for a new site: these figures are the original"
              " model's recipe on its training data, with the temperatures"
              " and thresholds fitted there, not this artifact's on the"
              " site.", ""]
  if report.source == schemas.CV_SOURCE_REPORT:
    lines += ["These figures come from an earlier `python -m training cv`"
              " run with the same settings on the same images (data"
              " fingerprint checked), passed to `train` with `--cv_report`;"
              " `train` did not run the folds again.", ""]
  lines += [
      f"The recipe that made this model was first run"
      f" {_or_na(report.folds)} times on the same"
      f" {_or_na(report.images)} images"
      f" ({_or_na(report.groups)} near-duplicate groups), each time"
      " scoring one fold with a model trained, calibrated and thresholded on"
      " the other folds; an image and its near-duplicates (dHash within 2"
      " bits) never sit on both sides. These are the held-out figures of"
      " this recipe on these data; each fold model learnt from a fold fewer"
      " than the final model, so they are, if anything, slightly"
      " pessimistic for it. They hold for images like these only: another"
      " scanner or hospital can do much worse (see the note under Review"
      " threshold).",
      ""]
  summary = report.summary or {}

  def cell(name, value):
    return _pct(value) if name in _SHARES else _num(value)

  rows = []
  for title, name in _CV_ROWS:
    stats = summary.get(name) or metadata_schema.FigureSummary()
    if stats.mean is None and pooled.get(name) is None:
      continue
    mean_sd = f"{cell(name, stats.mean)} ± {cell(name, stats.sd)}"
    rows.append([title if "fixed" not in name else
                 title.replace("the fixed threshold",
                               f"the fixed {_num(fixed)}"),
                 mean_sd, cell(name, pooled.get(name))])
  lines += _table(["figure", "mean ± sd over folds",
                   f"pooled ({pooled.get('count', NA)} images)"], rows)
  flagging = metadata.flagging or metadata_schema.Flagging()
  on_cv = (flagging.chosen_on == schemas.THRESHOLD_ON_CV
           and not metadata.recalibration)
  lines += ["", "Each fold used its own chosen threshold (per fold: "
            + ", ".join(_num(f.threshold, 3) for f in report.per_fold or ())
            + (", each chosen on the fold's validation split; this model's"
               " was chosen on the out-of-fold predictions instead, and"
               " Review threshold gives that route's held-out figures"
               if on_cv else "")
            + "). Pooled: every image scored by the fold model that did not"
            " see it. Full report: `cv.json`; every image's out-of-fold"
            f" prediction: `{artifact_schema.CV_PREDICTIONS_FILE}`.", ""]
  if report.lesion_localisation:
    lines += _cv_localisation(evaluation_schema.LesionLocalisation.from_json(
        report.lesion_localisation))
  return lines


def _calibration_section(metadata: ArtifactMetadata) -> List[str]:
  cal = metadata.calibration or metadata_schema.Calibration()
  lines = ["## Calibration", ""]
  if metadata.recalibration:
    lines += [f"> Recalibrated for a new site: this model's temperature is"
              f" now {_num(metadata.temperature)}. This section and"
              " the next describe the model as trained, on its own"
              " validation and test splits; \"Recalibration for a new"
              " site\" has the figures on the site sample.", ""]
  temperature = (metadata.temperature if cal.temperature is None else
                 cal.temperature)
  if cal.fitted:
    lines += [f"Temperature scaling: the logits are divided by **T ="
              f" {_num(temperature)}** inside the model (layer"
              " `temperature`), so every consumer of model.keras gets the"
              f" calibrated probabilities. T was fitted on the"
              f" {cal.fit_split or 'val'} split"
              f" ({_or_na(cal.fit_count)} images) by minimising the"
              f" negative log-likelihood ({_num(cal.nll_before)} at"
              f" T=1 → {_num(cal.nll_after)}). T > 1 means the raw"
              " model was over-confident, T < 1 under-confident.", ""]
    if cal.at_bound:
      lines += ["> **T hit the end of its search range**: the validation"
                " split is perfectly separated (its likelihood keeps"
                " improving with ever sharper probabilities), or the raw"
                " logits are extreme. Treat these probabilities as"
                " uncalibrated.", ""]
  else:
    lines += [f"Not calibrated (T = {_num(temperature)}):"
              f" {cal.reason or 'no calibration recorded'}.", ""]
  split_name = cal.split or "test"
  if cal.count == 0:
    if not _cross_validated(metadata):
      return lines + ["No test split to measure the calibration on, and no"
                      " cross-validation: no held-out ECE.", ""]
    return lines + [
        "No test split to measure the calibration on: the cross-validated"
        " ECE above is the held-out figure (each fold fitted its own"
        " temperature on its validation split).", ""]
  lines += _table(
      ["expected calibration error", "value"],
      [[f"ECE on {split_name}, T = 1 (before)", _num(cal.ece_before)],
       [f"ECE on {split_name}, T = {_num(temperature)} (after)",
        _num(cal.ece_after)],
       ["bins", f"{_or_na(cal.bins)} equal-width confidence bins"],
       ["images", _or_na(cal.count)]])
  lines += ["", f"Reliability diagram: "
            f"`{artifact_schema.RELIABILITY_DIAGRAM_FILE}`.", ""]
  return lines


def _rule_phrase(rule: Optional[str], images: str) -> str:
  """What a chosen threshold's rule holds to the target."""
  if rule == schemas.THRESHOLD_RULE_EXPECTED:
    return (f"accuracy the calibrated model expects of the {images} images"
            " not flagged (their mean confidence; `--threshold_rule"
            " expected`)")
  return f"{images} accuracy on the images not flagged"


def _threshold_section(metadata: ArtifactMetadata) -> List[str]:
  flagging = metadata.flagging or metadata_schema.Flagging()
  threshold = metadata.threshold
  source = _threshold_source(metadata)
  on_cv = flagging.chosen_on == schemas.THRESHOLD_ON_CV
  lines = ["## Review threshold", "",
           f"Scoring flags an image for review when its top probability is"
           f" below **{_num(threshold, 4)}**."]
  if metadata.recalibration:
    lines.append("Source: refitted on a site sample (see \"Recalibration for"
                 " a new site\"). Any table below is the model's as trained,"
                 " at its threshold then, on its own splits.")
  elif source == schemas.THRESHOLD_TARGET_ACCURACY:
    target = metadata.target_accuracy
    where = "out-of-fold" if on_cv else "validation"
    lines.append(
        f"Source: `--target_accuracy {_num(target)}`: the lowest {where}"
        " confidence at which the "
        + _rule_phrase(flagging.rule, where)
        + f" reaches {_pct(target)}, after calibration.")
    if on_cv and flagging.out_of_fold:
      lines += ["", *_out_of_fold_lines(flagging.out_of_fold)]
    if flagging.target_reached is False:
      lines += ["", f"> **The target {_pct(target)} was not reached** on"
                f" {where} images at any threshold: the threshold fell back"
                f" to the highest {where} confidence, which flags nearly"
                " every image. The model is not fit for this target."]
  else:
    lines.append("Source: fixed (`--threshold`).")
  lines.append("")
  rows = []
  fixed = flagging.fixed or metadata_schema.FixedFlagging()
  for name, split_name, stats in (
      ("chosen", "val", flagging.val), ("chosen", "test", flagging.test),
      ("fixed", "val", fixed.val), ("fixed", "test", fixed.test)):
    if not stats:
      continue
    rows.append([f"{_num(stats.threshold, 4)} ({name})", split_name,
                 _or_na(stats.count), _pct(stats.flagged_share),
                 _num(stats.accuracy_confident), _num(stats.accuracy_flagged),
                 _num(stats.accuracy)])
  if rows:
    lines += _table(["threshold", "split", "images", "flagged",
                     "accuracy, not flagged", "accuracy, flagged",
                     "accuracy, all"], rows)
    chose = ("Validation stopped the training and fitted the temperature"
             if on_cv else
             "Validation chose the threshold (and stopped the training and"
             " fitted the temperature)")
    lines += ["", "The images not flagged are the ones a reader might be"
              f" tempted to trust. {chose}, so its"
              " figures are in-sample; the honest ones are the test split's"
              " when there is one, and the cross-validated ones above" +
              ("." if _cross_validated(metadata) else
               " when they were measured (not for this artifact).")]
  else:
    lines.append("No labelled validation or test images: no figures.")
  return lines + ["", _LOCAL_DATA_NOTE, ""]


def _out_of_fold_lines(block: metadata_schema.OutOfFoldFlagging
                      ) -> List[str]:
  """What a threshold chosen on cv's out-of-fold predictions rests on, and
  how the same choice held on folds it was not made on."""
  pooled = block.pooled or metadata_schema.FlagStats()
  summary = block.summary or {}
  flagged = summary.get("flagged_share") or metadata_schema.FigureSummary()
  right = (summary.get("accuracy_confident")
           or metadata_schema.FigureSummary())
  return [
      f"It was chosen on the {_or_na(block.count)} out-of-fold predictions of"
      " the cross-validation above (`--threshold_on cv`): every training"
      " image, scored by the fold model that never saw it and calibrated by"
      " that fold's temperature, rather than the validation split alone."
      " The final model, trained on more images, is taken to be calibrated"
      " like its fold models.",
      "",
      "Chosen the same way on all folds but one and applied to that one,"
      f" it flagged {_pct(flagged.mean)} ± {_pct(flagged.sd)} of each"
      f" fold, with {_num(right.mean)} ± {_num(right.sd)} accuracy on"
      f" the rest (pooled over the {_or_na(pooled.count)} images:"
      f" {_pct(pooled.flagged_share)} flagged,"
      f" {_num(pooled.accuracy_confident)} right on the rest). These are"
      " the threshold's held-out figures. The validation rows below did"
      " not choose it, but they fitted the temperature."]


# Said on every card: a threshold chosen on one data set says little about
# another site's images, and the two commands that find out and fix it.
_LOCAL_DATA_NOTE = "\n".join([
    "**The threshold's accuracy holds only for data like the images it was"
    " chosen on** (the validation split or the cross-validation's"
    " out-of-fold predictions; for a recalibrated artifact, the"
    " site sample's fit part). Before relying on it at another site or"
    " scanner, check it on labelled local images (`metrics.json` →"
    " `flagging`, `ece`, `warnings`):",
    "",
    "    python -m training evaluate --model DIR --data LOCAL_GLOB"
    " --output REPORT",
    "",
    "and, if it does not hold, refit the temperature and threshold on them,"
    " keeping every weight (a new artifact; part of the images is held out"
    " to report on):",
    "",
    "    python -m training recalibrate --model DIR --data LOCAL_GLOB"
    " --output NEW_DIR",
    "",
    "Every scoring run compares the share of images it flags low-confidence"
    " with the held-out share this card reports (and the share out of"
    " distribution with the detector's design rate), and warns when it is"
    " far higher (the run manifest's `flag_rates`).",
])


def _recalibration_section(metadata: ArtifactMetadata) -> List[str]:
  """Before / after figures of a recalibrated artifact on its site sample."""
  block = metadata.recalibration
  if not block:
    return []
  parent = block.parent or metadata_schema.RecalibrationParent()
  temp = block.temperature or metadata_schema.RecalibratedTemperature()
  thr = block.threshold or metadata_schema.RecalibratedThreshold()
  check = block.check or metadata_schema.RecalibrationCheck()
  before = check.before or metadata_schema.SiteFigures()
  after = check.after or metadata_schema.SiteFigures()
  counts = block.class_counts or {}
  fingerprint = (block.data_fingerprint or {}).get("overall", NA)
  held_out = 0 if check.in_sample else _or_na(check.count)
  lines = [
      "## Recalibration for a new site", "",
      f"This artifact is **{_or_na(metadata.parent_model_version)}**"
      f" (model.keras sha256 `{_or_na(metadata.parent_model_sha256)}`) with"
      " only its temperature and review threshold refitted on a labelled"
      " sample from another site. Every other weight is the parent's: the"
      " predicted classes, the test metrics and the confusion matrix above"
      " are unchanged, and so are the companion plots and `split.json`.", "",
      f"Sample: {_or_na(block.images)} labelled images (fingerprint"
      f" `{fingerprint}`): {_or_na(temp.fit_count)} to fit on,"
      f" {held_out} held out (`--holdout_fraction"
      f" {_or_na(block.holdout_fraction)}`, seed {_or_na(block.seed)};"
      " near-duplicates kept in one part,"
      f" {_or_na(block.near_duplicates_grouped)} images in such groups;"
      f" the parts' image_ids in `{schemas.RECALIBRATION_SPLIT_FILE}`;"
      " `python -m training evaluate` marks the fit part's images, and"
      " near-duplicates of them, in its"
      f" `{schemas.COLUMN_IN_RECALIBRATION_FIT}` column and count: calibration"
      " figures over them are in-sample).",
      ""]
  labels = list(metadata.labels)
  rows = [[name] + [part.get(l, 0) for l in labels]
          for name, part in counts.items() if part]
  if rows:
    lines += _table(["part"] + labels, rows) + [""]
  if temp.fitted:
    lines.append(
        f"Temperature {_num(parent.temperature, 4)} →"
        f" **{_num(temp.temperature, 4)}**, fitted on the fit part"
        f" (NLL {_num(temp.nll_parent)} at the parent's temperature →"
        f" {_num(temp.nll_after)}).")
  else:
    lines.append(f"Temperature kept at the parent's"
                 f" {_num(temp.temperature, 4)}: {_or_na(temp.reason)} (the"
                 f" fit gave {_num(temp.fitted_value, 4)}).")
  if thr.source == schemas.THRESHOLD_TARGET_ACCURACY:
    source = ("the lowest confidence at which the "
              + _rule_phrase(thr.rule, "fit part's")
              + f" reaches {_pct(thr.target_accuracy)}")
  else:
    source = "fixed (`--threshold`)"
  lines += [f"Threshold {_num(parent.threshold, 4)} →"
            f" **{_num(thr.threshold, 4)}**: {source}.", ""]
  if thr.target_reached is False:
    lines += [f"> **The target {_pct(thr.target_accuracy)} was not"
              " reached** on the fit part at any threshold: the threshold"
              " fell back to its highest confidence, which flags nearly every"
              " image.", ""]
  if check.in_sample:
    lines += ["> **In-sample figures** (`--holdout_fraction 0`): the"
              " temperature and threshold were fitted on the very images"
              f" below ({_or_na(check.count)}), so the recalibrated"
              " column is optimistic.", ""]
  else:
    lines += [f"On the {_or_na(check.count)} held-out images (used for"
              " neither the temperature nor the threshold):", ""]
  rows = [["temperature", _num(before.temperature, 4),
           _num(after.temperature, 4)],
          ["threshold", _num(before.threshold, 4), _num(after.threshold, 4)],
          ["accuracy, all", _num(before.accuracy), _num(after.accuracy)],
          ["ECE (15 bins)", _num(before.ece), _num(after.ece)],
          ["NLL", _num(before.nll), _num(after.nll)],
          ["flagged", f"{_or_na(before.flagged)}"
                      f" ({_pct(before.flagged_share)})",
           f"{_or_na(after.flagged)} ({_pct(after.flagged_share)})"],
          ["accuracy, not flagged", _num(before.accuracy_confident),
           _num(after.accuracy_confident)],
          ["accuracy, flagged", _num(before.accuracy_flagged),
           _num(after.accuracy_flagged)]]
  lines += _table(["site sample", "parent (before)", "recalibrated (after)"],
                  rows)
  confident = (after.count or 0) - (after.flagged or 0)
  if after.accuracy_confident is not None and confident > 0:
    low, high = wilson_interval(after.accuracy_confident, confident)
    lines += ["", f"On {confident} images not flagged, the recalibrated"
              f" accuracy {_num(after.accuracy_confident)} has a 95 %"
              f" Wilson interval of {low:.3f}–{high:.3f}."]
  return lines + [""]


def _caveats_section(metadata: ArtifactMetadata) -> List[str]:
  training = _training(metadata)
  lines = ["## Known data caveats", ""]
  if metadata.is_synthetic:
    lines += ["- **Synthetic phantoms.** The training images are generated"
              " frames (layered tissue, speckle, drawn lesions), not scans."
              " Whatever the model learnt separates the generator's"
              " classes; none of the figures above transfers to patients.",
              ""]
  lines += [
      "If trained on BUSI (Breast Ultrasound Images Dataset, Al-Dhabyani et"
      " al., Data in Brief 2020), as intended:",
      "",
      "- **Duplicates and near-duplicates**, some filed under two classes."
      " Training uses an image once per image_id (sha256 of the file bytes;"
      f" {_or_na(training.duplicates_skipped)} repeats skipped here),"
      " drops images stored under conflicting classes"
      f" ({_or_na(training.conflicting_labels_skipped)} here), and groups"
      " near-duplicates (64-bit difference hash within 2 bits) with"
      " union-find so that a group never straddles two splits"
      f" ({_or_na(training.near_duplicates_grouped)} images in such"
      " groups here). Re-crops, rescaled or differently annotated copies of"
      " one frame can still escape the hash, so test figures may be"
      " optimistic. Together with the axilla images and the burned-in"
      " annotations below, this makes any single split of BUSI optimistic:"
      " trust the cross-validated figures over one split's, and a"
      " local evaluation over both.",
      "- **Burned-in annotations**: many frames carry calipers, measurement"
      " text, arrows, body markers and scanner overlays. Calipers and"
      " measurements are drawn on lesions, so they correlate with the label:"
      " a model can learn those marks instead of the tissue."
      + (" This model was trained with synthetic calipers, lines and text"
         " on its random views of every class, which on the"
         " development set cut how much marks move its predictions"
         " (training/README.md, \"Burned-in annotations\"), but not to"
         " nothing." if training.annotated_views else "")
      + (" With block5 alone fine-tuned, as here, synthetic marks still cut"
         " normal recall by 0.08 and 0.10 on the two draws measured (marked"
         " normal tissue was called a lesion more often), against 0.01 for"
         " the whole base fine-tuned (one draw, on another CPU;"
         " training/README.md, \"The second draw, with the zoom-in\"):"
         " check marked normal frames on local data."
         if training.annotated_views
         and _block5_only(training) else "")
      + " Check the Grad-CAM overlays (`python -m training gradcam`), and"
      " expect worse results on clean frames.",
      "- **One centre, one vendor**: scans of about 600 women aged 25–75,"
      " acquired in 2018 at a single hospital in Cairo on GE LOGIQ E9"
      " systems. Other populations, scanners, probes and presets are out of"
      " distribution."
      + (" This model was trained with some views framed as a deeper depth"
         " setting shows them, which on the development set kept a zoom-out"
         " with a black border from breaking it (training/README.md,"
         " \"Depth\"). A shallower setting or a tighter crop, which shows"
         " the tissue larger, is trained on only as far as the random views'"
         " ±10 % zoom: on the development set a 1.3× zoom-in cut the"
         " default recipe's malignant recall by 0.16 with the heads alone"
         " and 0.10–0.11 with block5 fine-tuned (two draws), while macro-F1"
         " fell by 0.03 and 0.01–0.03 (training/README.md, \"The other"
         " direction: a shallower field\" and \"The second draw, with the"
         " zoom-in\"). With the heads on one draw, cutting the same field"
         " without magnifying it (black around it, itself a shift) cost 0.09"
         " of those 0.16, and training on views magnified 1.1–1.4× raised"
         " zoomed-in malignant recall by only 0.016: much of the loss looks"
         " like what a tighter frame does not show, which no augmentation"
         " puts back (training/README.md, \"The shallow counterpart,"
         " tried\"). As on unshifted images (36 of the 43 malignant"
         " images block5 missed, 30 of 34 on a second draw), most malignant"
         " images missed under either zoom were called benign rather than"
         " normal (no lesion): 49 of 60 and 37 of 52 zoomed in, 45 of 51 and"
         " 63 of 68 zoomed out (block5, two draws; the heads, on the first"
         " draw's folds: 130 of 191 and 112 of 126). A lesion called"
         " benign may get a second look less often than one called normal"
         " (training/README.md, \"Where the misses go\")."
         if training.deepened_views else "")
      + " Another site's depth, probe and preset need a check on local"
      " data, malignant recall first (`python -m training evaluate`, then"
      " `recalibrate`).",
      "- **Class imbalance**: BUSI has about 437 benign, 210 malignant and 133"
      " normal frames; training uses balanced class weights (the malignant"
      " one multiplied by the malignant weight below), but per-class"
      " figures for the small classes rest on few test images (see the"
      " counts above).",
      "- **Frames, not patients**: BUSI has several frames per patient and"
      " no patient identifier, so frames of one patient may sit in different"
      " splits.",
      "- **Labels** are per frame and folder-based; normal frames contain no"
      " lesion but may come from patients with lesions elsewhere.",
  ]
  return lines + [""]


def _training_section(metadata: ArtifactMetadata) -> List[str]:
  if metadata.is_test_artifact:
    return []
  training = _training(metadata)
  seconds = training.seconds or {}
  run = training.epochs_run or {}
  best = training.best_epoch or {}

  def epochs(stage, most):
    most = _or_na(most)
    if stage not in run:
      return most
    return (f"{run[stage]} run of at most {most}" +
            (f", best {best[stage]} kept" if best.get(stage) else ""))

  rows = [["head epochs (base frozen)", epochs("head", training.epochs)],
          ["fine-tune epochs", epochs("fine_tune", training.fine_tune_epochs)],
          ["fine-tuned base layers", _fine_tuned(training)],
          ["early stopping patience", _or_na(training.patience)],
          ["label smoothing", _or_na(training.label_smoothing)],
          ["weight averaging (EMA momentum)", _ema(training)],
          ["learning rates", f"{_or_na(training.learning_rate)} /"
                             f" {_or_na(training.fine_tune_learning_rate)}"
                             + _schedule(training)],
          ["batch size", _or_na(training.batch_size)],
          ["training arithmetic", _precision(training)],
          ["augmentation", _or_na(training.augment)],
          ["augmented views per training image",
           _or_na(training.augment_views)],
          ["scanner degradations (blur, resolution, speckle, JPEG)",
           _degraded(training)],
          ["synthetic burned-in annotations (calipers, lines, text)",
           _annotated(training)],
          ["deeper depth settings (smaller, from the top, on black)",
           _deepened(training)],
          ["cross-validation folds run first", _cv_folds(metadata)],
          ["val / test fractions", f"{_or_na(training.val_fraction)} /"
                                   f" {_or_na(training.test_fraction)}"],
          ["malignant class weight (x balanced)",
           _malignant_weight(training)],
          ["class weights", _or_na(training.class_weight)],
          ["wall seconds", seconds.get("total", NA)]]
  return ["## Training", ""] + _table(["setting", "value"], rows) + [""]


def _cv_folds(metadata: ArtifactMetadata) -> str:
  """How many folds `train` ran, and where figures it did not run came
  from."""
  folds = _or_na(_training(metadata).cv_folds)
  report = metadata.cross_validation
  if report and report.source == schemas.CV_SOURCE_REPORT:
    return (f"{folds} (the figures above: an earlier `cv` run of"
            f" {_or_na(report.folds)} folds, `--cv_report`)")
  return folds


def _precision(training) -> str:
  """What --training_precision computed in; artifacts from before the flag
  record none and were float32."""
  if training.precision in (None, "float32"):
    return "float32"
  stages = ("the augmented views' frozen-base pass" +
            (" and the fine-tune stage" if training.fine_tune_epochs else ""))
  return (f"{training.precision} for {stages} (float32 weights; the"
          " original view, the head stage and this artifact in float32)")


def _on_views(views) -> str:
  """"on views 3, 5, 7", or "none" (artifacts trained before an option
  record none)."""
  return "on views " + ", ".join(str(v) for v in views) if views else "none"


def _degraded(training) -> str:
  return _on_views(training.degraded_views)


def _annotated(training) -> str:
  phrase = _on_views(training.annotated_views)
  if not training.annotated_views:
    return phrase
  share = training.annotate_probability
  return phrase + (f", each image's with probability {share:g}"
                   if share is not None else ", about half the images'")


def _deepened(training) -> str:
  phrase = _on_views(training.deepened_views)
  if not training.deepened_views:
    return phrase
  share, scale = training.depth_probability, training.depth_scale
  return (phrase
          + (f", each image's with probability {share:g}"
             if share is not None else "")
          + (f", scaled by {scale[0]:g}–{scale[1]:g}" if scale else ""))


def _fine_tuned(training) -> str:
  """Which base layers trained: none, block5 (artifacts from before
  --fine_tune_from record no layer), or the recorded first one and every
  later one."""
  if not training.fine_tune_epochs:
    return "none (base frozen)"
  if _block5_only(training):
    return "block5"
  return f"{training.fine_tune_from} and every base layer after it"


def _block5_only(training) -> bool:
  """Whether the fine-tune stage trained all of block5 (from block5_conv1;
  artifacts from before --fine_tune_from record no layer) and nothing
  below it."""
  return bool(training.fine_tune_epochs) and training.fine_tune_from in (
      None, "block5_conv1")


def _malignant_weight(training) -> Any:
  # Artifacts trained before the setting existed used plain balanced weights.
  if training.malignant_weight is None and training.class_weight:
    return "1 (plain balanced weights)"
  return _or_na(training.malignant_weight)


def _ood_count(name: str, counted: Optional[metadata_schema.OodCount]
              ) -> List[Any]:
  if not counted:
    return [name, NA, NA]
  return [name, f"{counted.flagged} of {counted.count}",
          _pct(counted.flagged_share)]


def _ood_section(metadata: ArtifactMetadata) -> List[str]:
  """The out-of-distribution detector, or that there is none."""
  lines = ["## Out-of-distribution detector", ""]
  block = metadata.ood
  if block is None:
    return lines + [
        "This artifact has no out-of-distribution detector: scoring writes"
        " null `ood_score` and `out_of_distribution` columns, and only"
        " `low_confidence` and the quality flags set `needs_review`. Retrain"
        " with this release to get one.", ""]
  held_out = None
  if _cross_validated(metadata):
    held_out = metadata.cross_validation.summary.get("ood_flagged_share")
  chosen_on = {
      "val+train_out_of_fold": "the validation images and the training"
                               " images' out-of-fold scores",
      "val": "the validation images"}.get(block.threshold_split,
                                          str(block.threshold_split))
  lines += [
      f"`{schemas.OOD_FILE}`: Mahalanobis distance of an image's"
      f" `{block.feature_layer}` vector ({_or_na(block.dims)} pooled VGG16"
      f" features, {block.transform} transform) from those of the"
      f" {_or_na(block.fit_images)} training images, under a Ledoit-Wolf"
      f" shrunk covariance (shrinkage {_num(block.shrinkage)}). Threshold"
      f" **{_num(block.threshold)}**, chosen on {chosen_on} so that"
      f" {_pct(block.target_pass_rate)} of them pass; a score above it sets"
      " `out_of_distribution` (and `needs_review`).", ""]
  rows = [_ood_count("validation", block.val),
          _ood_count("training, out of fold", block.train_out_of_fold),
          _ood_count("test", block.test)]
  if held_out is not None and held_out.mean is not None:
    rows.append(["held-out cross-validation folds (mean ± sd)",
                 f"{held_out.n} folds",
                 f"{_pct(held_out.mean)} ± {_pct(held_out.sd)}"])
  lines += _table(["in-distribution images", "flagged", "share"], rows)
  lines += [
      "", "It measures how unlike the training images an image looks to this"
      " model, not whether the prediction is right: images from another"
      " scanner or hospital may score higher than these figures suggest."
      " `python -m training evaluate --ood GLOB` measures what it catches in"
      " an archive of images that are not breast ultrasound.", ""]
  return lines


def _files_section(metadata: ArtifactMetadata) -> List[str]:
  files = [(schemas.MODEL_FILE, "the model: raw uint8 pixels → calibrated"
            " probabilities"),
           (schemas.LABELS_FILE, "class names in output order"),
           (schemas.METADATA_FILE, "every number on this card, and more"),
           (artifact_schema.CONFUSION_MATRIX_FILE, "test confusion matrix"
            " (empty without a test split)"),
           (artifact_schema.RELIABILITY_DIAGRAM_FILE,
            "calibration before / after, test split (empty without one)"),
           (artifact_schema.CV_REPORT_FILE, "the cross-validation of the"
            " recipe run before training, or the `--cv_report` given (per"
            " fold, pooled, mean ± sd)"),
           (artifact_schema.CV_PREDICTIONS_FILE, "each image's out-of-fold"
            " prediction from that cross-validation (Parquet; absent for"
            " reports from before it)"),
           (artifact_schema.TRAINING_CURVES_FILE, "loss and accuracy per"
            " epoch"),
           (artifact_schema.SPLIT_FILE, "image_ids and dHashes of each"
            " split"),
           (schemas.OOD_FILE, "the out-of-distribution detector (mean and"
            " precision matrix; numpy .npz, no pickle)")]
  if not _cross_validated(metadata):  # `--cv_folds 0` writes no cv.json
    files = [f for f in files if f[0] not in (
        artifact_schema.CV_REPORT_FILE, artifact_schema.CV_PREDICTIONS_FILE)]
  return (["## Files", ""] +
          _table(["file", "content"], [[f"`{n}`", d] for n, d in files]) +
          ["", "(An untrained test artifact has only the first three and this"
           " card.)", ""])


def render(metadata: ArtifactMetadata) -> str:
  """The model card (Markdown) for an artifact's metadata."""
  sections = (_header(metadata) + [_INTENDED_USE] + _data_section(metadata) +
              _cv_section(metadata) +
              _metrics_section(metadata) + _calibration_section(metadata) +
              _threshold_section(metadata) + _ood_section(metadata) +
              _recalibration_section(metadata) + _caveats_section(metadata) +
              _training_section(metadata) + _files_section(metadata))
  return "\n".join(sections).rstrip() + "\n"


def write(metadata: ArtifactMetadata, path: str, text: Optional[str] = None) -> str:
  """Writes the card to a local path; returns its text."""
  text = text if text is not None else render(metadata)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return text
