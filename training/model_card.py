"""MODEL_CARD.md: what a model is for, what it was trained on, how good and
how calibrated it is, and what to distrust — rendered from metadata.json.

`render(metadata)` is a pure function of the metadata (no TensorFlow), so the
card can never disagree with the numbers scoring reads; `save_artifact`
writes it into every artifact. Fields an artifact lacks are shown as "n/a".
"""

import math
from typing import Any, Dict, List, Optional, Sequence

import schemas
from schemas import artifact as artifact_schema

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


def _is_test_artifact(metadata: Dict) -> bool:
  return bool((metadata.get("training") or {}).get("untrained_test_artifact"))


def _is_synthetic(metadata: Dict) -> bool:
  return bool((metadata.get("training") or {}).get("synthetic_data"))


def _header(metadata: Dict) -> List[str]:
  lines = [f"# Model card: {metadata.get('model_version', NA)}", ""]
  if _is_test_artifact(metadata):
    lines += ["> **UNTRAINED TEST ARTIFACT.** Random weights, trained on no"
              " data, written by `training.testing.make_test_artifact` for"
              " software tests. Its predictions mean nothing; never use it on"
              " images of patients.", ""]
  if _is_synthetic(metadata):
    lines += ["> **TRAINED ON SYNTHETIC PHANTOMS**, not on patient images"
              " (`python -m training phantoms` or similar). It demonstrates"
              " the software only and says nothing about real ultrasound.",
              ""]
  training = metadata.get("training") or {}
  labels = metadata.get("labels") or []
  lines += _table(["field", "value"], [
      ["model_version", metadata.get("model_version", NA)],
      ["created_at", metadata.get("created_at", NA)],
      ["classes (output order)", ", ".join(labels) or NA],
      ["input", f"raw uint8 RGB {metadata.get('image_size', NA)}×"
                f"{metadata.get('image_size', NA)} (resized by"
                " `busi_core.imaging.decode_and_resize`)"],
      ["backbone", metadata.get("backbone", NA)],
      ["backbone weights", weights_provenance(metadata.get("weights_source"))],
      ["temperature", _num(metadata.get("temperature"))],
      ["review threshold", f"{_num(metadata.get('threshold'), 4)}"
                           f" ({metadata.get('threshold_source', 'fixed')})"],
      ["artifact format_version", metadata.get("format_version", NA)],
      ["package_version", metadata.get("package_version", NA)],
      ["seed", training.get("seed", NA)],
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


def _data_section(metadata: Dict) -> List[str]:
  lines = ["## Training data", ""]
  if _is_test_artifact(metadata):
    lines += ["None: this artifact was never trained.", ""]
  fingerprint = metadata.get("data_fingerprint") or {}
  counts = metadata.get("class_counts") or {}
  labels = metadata.get("labels") or []
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
  training = metadata.get("training") or {}
  skips = [("examples read", "examples_read"),
           ("unlabelled, skipped", "unlabelled_skipped"),
           ("exact duplicates (same bytes), used once", "duplicates_skipped"),
           ("same bytes under two classes, dropped",
            "conflicting_labels_skipped"),
           ("images in a near-duplicate group (kept in one split)",
            "near_duplicates_grouped")]
  if any(key in training for _, key in skips):
    lines += _table(["reading", "images"],
                    [[name, training.get(key, NA)] for name, key in skips])
    lines.append("")
  return lines


def _metrics_section(metadata: Dict) -> List[str]:
  report = metadata.get("test_metrics") or {}
  lines = [f"## Metrics (test split, {report.get('count', 0)} images)", ""]
  if not report.get("count"):
    return lines + ["No test images: no test split (the default:"
                    " cross-validation measures the recipe, and the model"
                    " learns from the rest)."
                    " Held-out figures: \"Cross-validated figures\" above.",
                    ""]
  macro = report.get("macro") or {}
  low, high = wilson_interval(report.get("accuracy") or 0.0, report["count"])
  lines += [f"Accuracy **{_num(report.get('accuracy'))}** (95 % Wilson"
            f" interval {low:.3f}–{high:.3f} for {report['count']} images);"
            f" macro precision {_num(macro.get('precision'))}, recall"
            f" {_num(macro.get('recall'))}, F1 {_num(macro.get('f1'))}."
            " The test split influenced neither training, calibration nor"
            " the threshold.", ""]
  rows = [[label, _num(row.get("precision")), _num(row.get("recall")),
           _num(row.get("f1")), row.get("support", NA)]
          for label, row in (report.get("per_class") or {}).items()]
  lines += _table(["class", "precision", "recall", "F1", "support"], rows)
  labels = report.get("labels") or []
  matrix = report.get("confusion_matrix") or []
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
     "fixed_accuracy_unflagged"))
_SHARES = ("flagged_share", "fixed_flagged_share")


def _cv_section(metadata: Dict) -> List[str]:
  """The recipe's cross-validated figures on the training data."""
  report = metadata.get(artifact_schema.METADATA_CROSS_VALIDATION)
  lines = ["## Cross-validated figures (held-out folds of the training data)",
           ""]
  if not report:
    return lines + [
        "Not measured for this artifact (`--cv_folds 0`). Run `python -m"
        " training cv --data GLOB` with the same flags to know how the"
        " recipe does on images it has not seen.", ""]
  fixed = (report.get("pooled") or {}).get("fixed_threshold")
  if metadata.get(schemas.METADATA_RECALIBRATION):
    lines += ["> Recalibrated for a new site: these figures are the original"
              " model's recipe on its training data, with the temperatures"
              " and thresholds fitted there, not this artifact's on the"
              " site.", ""]
  lines += [
      f"The recipe that made this model was first run"
      f" {report.get('folds', NA)} times on the same"
      f" {report.get('images', NA)} images"
      f" ({report.get('groups', NA)} near-duplicate groups), each time"
      " scoring one fold with a model trained, calibrated and thresholded on"
      " the other folds; an image and its near-duplicates (dHash within 2"
      " bits) never sit on both sides. These are the held-out figures of"
      " this recipe on these data; each fold model learnt from a fold fewer"
      " than the final model, so they are, if anything, slightly"
      " pessimistic for it. They hold for images like these only: another"
      " scanner or hospital can do much worse (see the note under Review"
      " threshold).",
      ""]
  summary = report.get("summary") or {}
  pooled = report.get("pooled") or {}

  def cell(name, value):
    return _pct(value) if name in _SHARES else _num(value)

  rows = []
  for title, name in _CV_ROWS:
    stats = summary.get(name) or {}
    if stats.get("mean") is None and pooled.get(name) is None:
      continue
    mean_sd = (f"{cell(name, stats.get('mean'))} ±"
               f" {cell(name, stats.get('sd'))}")
    rows.append([title if "fixed" not in name else
                 title.replace("the fixed threshold",
                               f"the fixed {_num(fixed)}"),
                 mean_sd, cell(name, pooled.get(name))])
  lines += _table(["figure", "mean ± sd over folds",
                   f"pooled ({pooled.get('count', NA)} images)"], rows)
  lines += ["", "Each fold used its own chosen threshold (per fold:"
            + ", ".join(f" {_num(f.get('threshold'), 3)}"
                        for f in report.get("per_fold") or [])
            + "). Pooled: every image scored by the fold model that did not"
            " see it. Full report: `cv.json`.", ""]
  return lines


def _calibration_section(metadata: Dict) -> List[str]:
  cal = metadata.get("calibration") or {}
  lines = ["## Calibration", ""]
  if metadata.get(schemas.METADATA_RECALIBRATION):
    lines += [f"> Recalibrated for a new site: this model's temperature is"
              f" now {_num(metadata.get('temperature'))}. This section and"
              " the next describe the model as trained, on its own"
              " validation and test splits; \"Recalibration for a new"
              " site\" has the figures on the site sample.", ""]
  temperature = cal.get("temperature", metadata.get("temperature"))
  if cal.get("fitted"):
    lines += [f"Temperature scaling: the logits are divided by **T ="
              f" {_num(temperature)}** inside the model (layer"
              " `temperature`), so every consumer of model.keras gets the"
              f" calibrated probabilities. T was fitted on the"
              f" {cal.get('fit_split', 'val')} split"
              f" ({cal.get('fit_count', NA)} images) by minimising the"
              f" negative log-likelihood ({_num(cal.get('nll_before'))} at"
              f" T=1 → {_num(cal.get('nll_after'))}). T > 1 means the raw"
              " model was over-confident, T < 1 under-confident.", ""]
    if cal.get("at_bound"):
      lines += ["> **T hit the end of its search range**: the validation"
                " split is perfectly separated (its likelihood keeps"
                " improving with ever sharper probabilities), or the raw"
                " logits are extreme. Treat these probabilities as"
                " uncalibrated.", ""]
  else:
    lines += [f"Not calibrated (T = {_num(temperature)}):"
              f" {cal.get('reason', 'no calibration recorded')}.", ""]
  split_name = cal.get("split", "test")
  if cal.get("count") == 0:
    return lines + [
        "No test split to measure the calibration on: the cross-validated"
        " ECE above is the held-out figure (each fold fitted its own"
        " temperature on its validation split).", ""]
  lines += _table(
      ["expected calibration error", "value"],
      [[f"ECE on {split_name}, T = 1 (before)", _num(cal.get("ece_before"))],
       [f"ECE on {split_name}, T = {_num(temperature)} (after)",
        _num(cal.get("ece_after"))],
       ["bins", f"{cal.get('bins', NA)} equal-width confidence bins"],
       ["images", cal.get("count", NA)]])
  lines += ["", f"Reliability diagram: "
            f"`{artifact_schema.RELIABILITY_DIAGRAM_FILE}`.", ""]
  return lines


def _threshold_section(metadata: Dict) -> List[str]:
  flagging = metadata.get("flagging") or {}
  threshold = metadata.get("threshold")
  source = metadata.get("threshold_source", "fixed")
  lines = ["## Review threshold", "",
           f"Scoring flags an image for review when its top probability is"
           f" below **{_num(threshold, 4)}**."]
  if metadata.get(schemas.METADATA_RECALIBRATION):
    lines.append("Source: refitted on a site sample (see \"Recalibration for"
                 " a new site\"). Any table below is the model's as trained,"
                 " at its threshold then, on its own splits.")
  elif source == schemas.THRESHOLD_TARGET_ACCURACY:
    target = metadata.get("target_accuracy")
    lines.append(
        f"Source: `--target_accuracy {_num(target)}`: the lowest validation"
        " confidence at which the validation accuracy on the images not"
        f" flagged reaches {_pct(target)}, after calibration.")
    if flagging.get("target_reached") is False:
      lines += ["", f"> **The target {_pct(target)} was not reached** on"
                " validation at any threshold: the threshold fell back to the"
                " highest validation confidence, which flags nearly every"
                " image. The model is not fit for this target."]
  else:
    lines.append("Source: fixed (`--threshold`).")
  lines.append("")
  rows = []
  for name, block in (("chosen", flagging),
                      ("fixed", flagging.get("fixed") or {})):
    for split_name in ("val", "test"):
      stats = block.get(split_name)
      if not stats:
        continue
      rows.append([f"{_num(stats.get('threshold'), 4)} ({name})",
                   split_name, stats.get("count", NA),
                   _pct(stats.get("flagged_share")),
                   _num(stats.get("accuracy_confident")),
                   _num(stats.get("accuracy_flagged")),
                   _num(stats.get("accuracy"))])
  if rows:
    lines += _table(["threshold", "split", "images", "flagged",
                     "accuracy, not flagged", "accuracy, flagged",
                     "accuracy, all"], rows)
    lines += ["", "The images not flagged are the ones a reader might be"
              " tempted to trust. Validation chose the threshold (and"
              " stopped the training and fitted the temperature), so its"
              " figures are in-sample; the honest ones are the test split's"
              " when there is one, and the cross-validated ones above."]
  else:
    lines.append("No labelled validation or test images: no figures.")
  return lines + ["", _LOCAL_DATA_NOTE, ""]


# Said on every card: a threshold chosen on one data set says little about
# another site's images, and the two commands that find out and fix it.
_LOCAL_DATA_NOTE = "\n".join([
    "**The threshold's accuracy holds only for data like the images it was"
    " chosen on** (the validation split; for a recalibrated artifact, the"
    " site sample's fit part). Before relying on it at another site or"
    " scanner, check it on labelled local images (`metrics.json` →"
    " `flagging`, `ece`):",
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
])


def _recalibration_section(metadata: Dict) -> List[str]:
  """Before / after figures of a recalibrated artifact on its site sample."""
  block = metadata.get(schemas.METADATA_RECALIBRATION)
  if not block:
    return []
  parent = block.get("parent") or {}
  temp = block.get("temperature") or {}
  thr = block.get("threshold") or {}
  check = block.get("check") or {}
  before, after = check.get("before") or {}, check.get("after") or {}
  counts = block.get("class_counts") or {}
  fingerprint = (block.get("data_fingerprint") or {}).get("overall", NA)
  held_out = 0 if check.get("in_sample") else check.get("count", NA)
  parent_version = metadata.get(schemas.METADATA_PARENT_MODEL_VERSION, NA)
  lines = [
      "## Recalibration for a new site", "",
      f"This artifact is **{parent_version}** (model.keras sha256"
      f" `{metadata.get(schemas.METADATA_PARENT_MODEL_SHA256, NA)}`) with"
      " only its temperature and review threshold refitted on a labelled"
      " sample from another site. Every other weight is the parent's: the"
      " predicted classes, the test metrics and the confusion matrix above"
      " are unchanged, and so are the companion plots and `split.json`.", "",
      f"Sample: {block.get('images', NA)} labelled images (fingerprint"
      f" `{fingerprint}`): {temp.get('fit_count', NA)} to fit on,"
      f" {held_out} held out (`--holdout_fraction"
      f" {block.get('holdout_fraction', NA)}`, seed {block.get('seed', NA)};"
      " near-duplicates kept in one part,"
      f" {block.get('near_duplicates_grouped', NA)} images in such groups;"
      f" the parts' image_ids in `{schemas.RECALIBRATION_SPLIT_FILE}`).",
      ""]
  labels = metadata.get("labels") or []
  rows = [[name] + [part.get(l, 0) for l in labels]
          for name, part in counts.items() if part]
  if rows:
    lines += _table(["part"] + labels, rows) + [""]
  if temp.get("fitted"):
    lines.append(
        f"Temperature {_num(parent.get('temperature'), 4)} →"
        f" **{_num(temp.get('temperature'), 4)}**, fitted on the fit part"
        f" (NLL {_num(temp.get('nll_parent'))} at the parent's temperature →"
        f" {_num(temp.get('nll_after'))}).")
  else:
    lines.append(f"Temperature kept at the parent's"
                 f" {_num(temp.get('temperature'), 4)}:"
                 f" {temp.get('reason', NA)} (the fit gave"
                 f" {_num(temp.get('fitted_value'), 4)}).")
  if thr.get("source") == schemas.THRESHOLD_TARGET_ACCURACY:
    source = ("the lowest confidence at which the fit part's accuracy on the"
              " images not flagged reaches"
              f" {_pct(thr.get('target_accuracy'))}")
  else:
    source = "fixed (`--threshold`)"
  lines += [f"Threshold {_num(parent.get('threshold'), 4)} →"
            f" **{_num(thr.get('threshold'), 4)}**: {source}.", ""]
  if thr.get("target_reached") is False:
    lines += [f"> **The target {_pct(thr.get('target_accuracy'))} was not"
              " reached** on the fit part at any threshold: the threshold"
              " fell back to its highest confidence, which flags nearly every"
              " image.", ""]
  if check.get("in_sample"):
    lines += ["> **In-sample figures** (`--holdout_fraction 0`): the"
              " temperature and threshold were fitted on the very images"
              f" below ({check.get('count', NA)}), so the recalibrated"
              " column is optimistic.", ""]
  else:
    lines += [f"On the {check.get('count', NA)} held-out images (used for"
              " neither the temperature nor the threshold):", ""]
  rows = [["temperature", _num(before.get("temperature"), 4),
           _num(after.get("temperature"), 4)],
          ["threshold", _num(before.get("threshold"), 4),
           _num(after.get("threshold"), 4)]]
  for name, key in (("accuracy, all", "accuracy"),
                    ("ECE (15 bins)", "ece"), ("NLL", "nll")):
    rows.append([name, _num(before.get(key)), _num(after.get(key))])
  rows.append(["flagged", f"{before.get('flagged', NA)}"
               f" ({_pct(before.get('flagged_share'))})",
               f"{after.get('flagged', NA)}"
               f" ({_pct(after.get('flagged_share'))})"])
  for name, key in (("accuracy, not flagged", "accuracy_confident"),
                    ("accuracy, flagged", "accuracy_flagged")):
    rows.append([name, _num(before.get(key)), _num(after.get(key))])
  lines += _table(["site sample", "parent (before)", "recalibrated (after)"],
                  rows)
  confident = (after.get("count") or 0) - (after.get("flagged") or 0)
  if after.get("accuracy_confident") is not None and confident > 0:
    low, high = wilson_interval(after["accuracy_confident"], confident)
    lines += ["", f"On {confident} images not flagged, the recalibrated"
              f" accuracy {_num(after['accuracy_confident'])} has a 95 %"
              f" Wilson interval of {low:.3f}–{high:.3f}."]
  return lines + [""]


def _caveats_section(metadata: Dict) -> List[str]:
  training = metadata.get("training") or {}
  lines = ["## Known data caveats", ""]
  if _is_synthetic(metadata):
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
      f" {training.get('duplicates_skipped', NA)} repeats skipped here),"
      " drops images stored under conflicting classes"
      f" ({training.get('conflicting_labels_skipped', NA)} here), and groups"
      " near-duplicates (64-bit difference hash within 2 bits) with"
      " union-find so that a group never straddles two splits"
      f" ({training.get('near_duplicates_grouped', NA)} images in such"
      " groups here). Re-crops, rescaled or differently annotated copies of"
      " one frame can still escape the hash, so test figures may be"
      " optimistic. Together with the axilla images and the burned-in"
      " annotations below, this makes any single split of BUSI optimistic:"
      " trust the cross-validated figures over one split's, and a"
      " local evaluation over both.",
      "- **Burned-in annotations**: many frames carry calipers, measurement"
      " text, arrows, body markers and scanner overlays. Calipers and"
      " measurements are drawn on lesions, so they correlate with the label:"
      " a model can learn those marks instead of the tissue. Check the"
      " Grad-CAM overlays (`python -m training gradcam`), and expect worse"
      " results on clean frames.",
      "- **One centre, one vendor**: scans of about 600 women aged 25–75,"
      " acquired in 2018 at a single hospital in Cairo on GE LOGIQ E9"
      " systems. Other populations, scanners, probes and presets are out of"
      " distribution.",
      "- **Class imbalance**: BUSI has about 437 benign, 210 malignant and 133"
      " normal frames; training uses balanced class weights, but per-class"
      " figures for the small classes rest on few test images (see the"
      " counts above).",
      "- **Frames, not patients**: BUSI has several frames per patient and"
      " no patient identifier, so frames of one patient may sit in different"
      " splits.",
      "- **Labels** are per frame and folder-based; normal frames contain no"
      " lesion but may come from patients with lesions elsewhere.",
  ]
  return lines + [""]


def _training_section(metadata: Dict) -> List[str]:
  training = metadata.get("training") or {}
  if _is_test_artifact(metadata):
    return []
  seconds = training.get("seconds") or {}
  run = training.get("epochs_run") or {}
  best = training.get("best_epoch") or {}

  def epochs(stage, most):
    if stage not in run:
      return most
    return (f"{run[stage]} run of at most {most}" +
            (f", best {best[stage]} kept" if best.get(stage) else ""))

  rows = [["head epochs (base frozen)",
           epochs("head", training.get("epochs", NA))],
          ["fine-tune epochs (block5 unfrozen)",
           epochs("fine_tune", training.get("fine_tune_epochs", NA))],
          ["early stopping patience", training.get("patience", NA)],
          ["label smoothing", training.get("label_smoothing", NA)],
          ["learning rates", f"{training.get('learning_rate', NA)} /"
                             f" {training.get('fine_tune_learning_rate', NA)}"],
          ["batch size", training.get("batch_size", NA)],
          ["augmentation", training.get("augment", NA)],
          ["augmented views per training image",
           training.get("augment_views", NA)],
          ["cross-validation folds run first", training.get("cv_folds", NA)],
          ["val / test fractions", f"{training.get('val_fraction', NA)} /"
                                   f" {training.get('test_fraction', NA)}"],
          ["class weights", training.get("class_weight", NA)],
          ["wall seconds", seconds.get("total", NA)]]
  return ["## Training", ""] + _table(["setting", "value"], rows) + [""]


def _files_section() -> List[str]:
  files = [(schemas.MODEL_FILE, "the model: raw uint8 pixels → calibrated"
            " probabilities"),
           (schemas.LABELS_FILE, "class names in output order"),
           (schemas.METADATA_FILE, "every number on this card, and more"),
           (artifact_schema.CONFUSION_MATRIX_FILE, "test confusion matrix"
            " (empty without a test split)"),
           (artifact_schema.RELIABILITY_DIAGRAM_FILE,
            "calibration before / after, test split (empty without one)"),
           (artifact_schema.CV_REPORT_FILE, "the cross-validation of the"
            " recipe run before training (per fold, pooled, mean ± sd)"),
           (artifact_schema.TRAINING_CURVES_FILE, "loss and accuracy per"
            " epoch"),
           (artifact_schema.SPLIT_FILE, "image_ids and dHashes of each"
            " split")]
  return (["## Files", ""] +
          _table(["file", "content"], [[f"`{n}`", d] for n, d in files]) +
          ["", "(An untrained test artifact has only the first three and this"
           " card.)", ""])


def render(metadata: Dict) -> str:
  """The model card (Markdown) for an artifact's metadata."""
  sections = (_header(metadata) + [_INTENDED_USE] + _data_section(metadata) +
              _cv_section(metadata) +
              _metrics_section(metadata) + _calibration_section(metadata) +
              _threshold_section(metadata) +
              _recalibration_section(metadata) + _caveats_section(metadata) +
              _training_section(metadata) + _files_section())
  return "\n".join(sections).rstrip() + "\n"


def write(metadata: Dict, path: str, text: Optional[str] = None) -> str:
  """Writes the card to a local path; returns its text."""
  text = text if text is not None else render(metadata)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return text
