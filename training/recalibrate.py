"""`recalibrate`: refit an artifact's temperature and review threshold on a
labelled sample from a new site (hospital, scanner), keeping every weight.

Another centre's images shift the model's confidences: the temperature
fitted on the training data's validation split, and the threshold chosen
there, no longer mean what the model card says. Refitting those two numbers
needs far fewer labelled images than retraining, and changes no prediction
(argmax), only the probabilities and which images are flagged for review.

Fitting and reporting on the same images flatters the result, so the sample
is split with the training split's own duplicate-aware, label-stratified
dealing (`split.split_indices`; near-duplicate frames never straddle the two
parts) into a fit part, on which the temperature is fitted and the threshold
chosen, and a held-out part, on which the parent's and the new calibration
are compared. `--holdout_fraction 0` fits on everything and reports
in-sample figures, and says so.

The result is a new artifact (new model_version; the parent's recorded in
its metadata); the parent directory is only read.
"""

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

import schemas
from schemas import artifact as artifact_schema
from schemas import metadata as metadata_schema
from schemas.metadata import ArtifactMetadata
from training import calibration, config as config_lib, data as data_lib
from busi_core import artifact, output_dirs
from training import evaluate, saving
from training import model as model_lib, recipe, split
from busi_core.layers import TemperatureScaling

_LOG = logging.getLogger(__name__)

FIT = artifact_schema.RECALIBRATION_FIT
HOLDOUT = artifact_schema.RECALIBRATION_HOLDOUT

# The parent's companion files: they describe its training and its own test
# split, which the shared weights still match (no argmax changes), so the new
# artifact keeps them. split.json in particular lets `evaluate` spot images
# the weights were trained on.
_COMPANION_FILES = (artifact_schema.CONFUSION_MATRIX_FILE,
                    artifact_schema.TRAINING_CURVES_FILE,
                    artifact_schema.SPLIT_FILE,
                    artifact_schema.RELIABILITY_DIAGRAM_FILE,
                    artifact_schema.CV_REPORT_FILE,
                    artifact_schema.CV_PREDICTIONS_FILE,
                    # The weights are the parent's, so are the features: its
                    # OOD detector (inherited in the metadata) still holds.
                    schemas.OOD_FILE)


@dataclasses.dataclass(frozen=True)
class RecalibrateConfig:
  """What `python -m training recalibrate` was asked to do."""
  model: str  # the parent artifact (read only)
  data: Tuple[str, ...]  # globs of the site sample's TFRecords
  output: str  # the new artifact
  target_accuracy: Optional[float] = None  # None: DEFAULT_TARGET_ACCURACY
  threshold: Optional[float] = None  # a fixed threshold instead of a target
  threshold_rule: str = schemas.DEFAULT_THRESHOLD_RULE  # for a target
  holdout_fraction: float = schemas.DEFAULT_HOLDOUT_FRACTION
  seed: int = 0  # decides the fit / held-out split
  name: Optional[str] = None  # model_version prefix; None: the parent's
  overwrite: bool = False
  batch_size: int = 32

  @property
  def target(self) -> Optional[float]:
    """The target accuracy the threshold is chosen for (None: fixed)."""
    if self.threshold is not None:
      return None
    return (schemas.DEFAULT_TARGET_ACCURACY if self.target_accuracy is None
            else self.target_accuracy)

  def validate(self) -> None:
    """Raises ValueError naming the first bad flag."""
    if not self.model:
      raise ValueError("--model is required")
    if not self.data:
      raise ValueError("--data is required")
    if not self.output:
      raise ValueError("--output is required")
    if self.threshold is not None and self.target_accuracy is not None:
      raise ValueError("pass --threshold (a fixed threshold) or"
                       " --target_accuracy (one chosen on the sample), not"
                       " both")
    if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
      raise ValueError(f"--threshold {self.threshold} is outside [0, 1]")
    if self.target is not None and not 0.0 < self.target <= 1.0:
      raise ValueError(f"--target_accuracy {self.target} is outside (0, 1]")
    config_lib.check_threshold_rule(self.threshold_rule)
    if not 0.0 <= self.holdout_fraction < 1.0:
      raise ValueError(f"--holdout_fraction {self.holdout_fraction} must be in"
                       " [0, 1): something must be left to fit on")
    if self.batch_size < 1:
      raise ValueError("--batch_size must be at least 1")
    if self.name is not None and (not self.name or "/" in self.name):
      raise ValueError("--name must be non-empty and contain no '/'")


class SampleParts(NamedTuple):
  """The site sample, dealt into the part fitted on and the held-out part."""
  fit: data_lib.LabelledData
  holdout: data_lib.LabelledData  # the fit part itself when in_sample
  in_sample: bool  # --holdout_fraction 0: the figures are not held out
  hashes: Dict[str, List[int]]  # part → dHash of each image
  near_duplicates_grouped: int  # images sharing a group with another


class TemperatureChoice(NamedTuple):
  temperature: float  # what the new model uses
  fitted: bool  # False: the parent's temperature was kept (see reason)
  reason: Optional[str]
  fit: calibration.TemperatureFit  # the raw search result on the fit part
  nll_parent: float  # fit part, at the parent's temperature
  nll_after: float  # fit part, at `temperature`


class ThresholdChoice(NamedTuple):
  threshold: float
  source: str  # schemas.THRESHOLD_FIXED or THRESHOLD_TARGET_ACCURACY
  target_accuracy: Optional[float]
  target_reached: Optional[bool]  # None for a fixed threshold
  rule: Optional[str] = None  # schemas.THRESHOLD_RULES; None when fixed


def _same_directory(a: str, b: str) -> bool:
  if "://" in a or "://" in b:
    return a.rstrip("/") == b.rstrip("/")
  return os.path.realpath(a) == os.path.realpath(b)


def _check_paths(config: RecalibrateConfig) -> None:
  """Refuses to write over the parent, into a file, or over an artifact
  unasked."""
  output_dirs.check_is_directory(config.output)
  if _same_directory(config.model, config.output):
    raise ValueError(
        f"--output {config.output} is the --model directory: recalibrate"
        " never modifies the parent artifact. Choose a new --output.")
  output_dirs.check_artifact_dir(config.output, config.overwrite)


def _split_sample(sample: data_lib.LabelledData, labels: Sequence[str],
                  holdout_fraction: float, seed: int) -> SampleParts:
  """Deals the sample into fit and held-out parts, duplicates kept together.

  Raises:
    ValueError: a part that must hold images is empty.
  """
  hashes = [split.dhash(image) for image in sample.images]
  # The training split's dealing, with "test" as the held-out part and no
  # validation part: the same grouping of near-duplicates and per-class
  # shares, and a result that depends on the seed alone.
  result = split.split_indices(sample.image_ids,
                               [labels[i] for i in sample.labels], hashes,
                               0.0, holdout_fraction, seed)
  fit_idx, holdout_idx = result.indices[split.TRAIN], result.indices[split.TEST]
  if not fit_idx:
    raise ValueError(
        f"the {len(sample.image_ids)} sample images left nothing to fit on at"
        f" --holdout_fraction {holdout_fraction:g}; lower it or add images")
  in_sample = holdout_fraction == 0.0
  if in_sample:
    holdout_idx = fit_idx
  elif not holdout_idx:
    raise ValueError(
        f"the {len(sample.image_ids)} sample images left none to hold out at"
        f" --holdout_fraction {holdout_fraction:g}; add images, raise it, or"
        " pass --holdout_fraction 0 for in-sample figures")
  sizes = np.bincount(result.group_of)
  return SampleParts(
      fit=data_lib.subset(sample, fit_idx),
      holdout=data_lib.subset(sample, holdout_idx),
      in_sample=in_sample,
      hashes={FIT: [hashes[i] for i in fit_idx],
              HOLDOUT: [hashes[i] for i in holdout_idx]},
      near_duplicates_grouped=int(sum(sizes[g] > 1 for g in result.group_of)))


def _fit_temperature(logits: np.ndarray, labels: np.ndarray,
                     parent_temperature: float) -> TemperatureChoice:
  """The temperature of the fit part; the parent's where the fit is unusable.

  A fit at the end of the search range (a perfectly separated sample, or
  extreme logits) would make every prediction look certain and switch the
  review flag off, as in training; the sample then cannot tell, and the
  parent's temperature is kept.
  """
  fit = calibration.fit_temperature(logits, labels)
  nll_parent = calibration.nll(logits, labels, parent_temperature)
  if fit.at_bound:
    message = (
        f"The temperature {fit.temperature:.4g} fitted on the sample"
        " sits at the end of its search range"
        f" [{calibration.MIN_TEMPERATURE:g}, {calibration.MAX_TEMPERATURE:g}]:"
        " the fit part is perfectly separated, or the logits are extreme. The"
        f" parent's temperature {parent_temperature:.4g} is kept; label more"
        " images, especially hard ones.")
    _LOG.warning(message)
    return TemperatureChoice(parent_temperature, False,
                             "fitted temperature at the search bound", fit,
                             nll_parent, nll_parent)
  return TemperatureChoice(fit.temperature, True, None, fit, nll_parent,
                           fit.nll_after)


def _choose_threshold(config: RecalibrateConfig, confidence: np.ndarray,
                      correct: np.ndarray) -> ThresholdChoice:
  """The fixed --threshold, or the one reaching the target on the fit part."""
  target = config.target
  if target is None:
    return ThresholdChoice(float(config.threshold), schemas.THRESHOLD_FIXED,
                           None, None)
  choice = calibration.choose_threshold(confidence, correct, target,
                                        config.threshold_rule)
  if not choice.reached:
    message = (
        f"No threshold reaches accuracy {target:g}"
        f" ({config.threshold_rule}) on the fit part's images it does not"
        " flag ("
        + calibration.unreached_reason(config.threshold_rule, "fit-part")
        + "). Falling back to its highest confidence,"
        f" {choice.threshold:.4f}, which flags nearly everything; the model"
        " card says so.")
    _LOG.warning(message)
  return ThresholdChoice(choice.threshold, schemas.THRESHOLD_TARGET_ACCURACY,
                         target, choice.reached, config.threshold_rule)


def _figures(logits: np.ndarray, labels: np.ndarray, temperature: float,
             threshold: float) -> metadata_schema.SiteFigures:
  """What one (temperature, threshold) does on labelled logits."""
  confidence, correct = recipe.confidence(logits, labels, temperature)
  reliability = calibration.reliability(confidence, correct)
  return metadata_schema.SiteFigures(
      temperature=float(temperature),
      **calibration.flag_stats(confidence, correct, threshold),
      ece=reliability["ece"],
      nll=round(calibration.nll(logits, labels, temperature), 6),
      reliability=reliability)


def _class_counts(part: data_lib.LabelledData,
                  labels: Sequence[str]) -> Dict[str, int]:
  return {label: int((part.labels == i).sum()) for i, label in
          enumerate(labels)}


def _recalibration_block(config: RecalibrateConfig, parent: artifact.Artifact,
                         stats: data_lib.ReadStats, parts: SampleParts,
                         temperature: TemperatureChoice,
                         threshold: ThresholdChoice,
                         fit_stats: metadata_schema.FlagStats,
                         before: metadata_schema.SiteFigures,
                         after: metadata_schema.SiteFigures,
                         warnings: Sequence[str]
                        ) -> metadata_schema.Recalibration:
  """The "recalibration" metadata block."""
  labels = parent.labels
  ids = {FIT: parts.fit.image_ids,
         HOLDOUT: [] if parts.in_sample else parts.holdout.image_ids}
  fit = temperature.fit
  return metadata_schema.Recalibration(
      parent=metadata_schema.RecalibrationParent(
          model_dir=config.model,
          model_version=parent.metadata.model_version,
          model_sha256=parent.model_sha256,
          temperature=before.temperature,
          threshold=before.threshold,
          threshold_source=(parent.metadata.threshold_source or
                            schemas.THRESHOLD_FIXED),
          target_accuracy=parent.metadata.target_accuracy),
      data=tuple(config.data),
      data_fingerprint=split.data_fingerprint(ids),
      examples_read=stats.examples,
      unlabelled_skipped=stats.unlabelled,
      unknown_label_skipped=stats.unknown_label,
      duplicates_skipped=stats.duplicates,
      conflicting_labels_skipped=stats.conflicting,
      images=stats.used,
      holdout_fraction=config.holdout_fraction,
      seed=config.seed,
      near_duplicates_grouped=parts.near_duplicates_grouped,
      class_counts={FIT: _class_counts(parts.fit, labels),
                    HOLDOUT: (None if parts.in_sample else
                              _class_counts(parts.holdout, labels))},
      temperature=metadata_schema.RecalibratedTemperature(
          temperature=temperature.temperature,
          fitted=temperature.fitted,
          reason=temperature.reason,
          fit_count=len(parts.fit.labels),
          fitted_value=float(fit.temperature),
          at_bound=fit.at_bound,
          nll_parent=round(temperature.nll_parent, 6),
          nll_after=round(temperature.nll_after, 6)),
      threshold=metadata_schema.RecalibratedThreshold(
          threshold=threshold.threshold,
          source=threshold.source,
          target_accuracy=threshold.target_accuracy,
          target_reached=threshold.target_reached,
          rule=threshold.rule,
          fit=fit_stats),
      # Parent = its temperature and threshold; after = the new ones; both on
      # the held-out part (the fit part itself when in_sample).
      check=metadata_schema.RecalibrationCheck(
          part=FIT if parts.in_sample else HOLDOUT,
          in_sample=parts.in_sample,
          count=len(parts.holdout.labels),
          before=before, after=after),
      warnings=tuple(warnings))


def _metadata(config: RecalibrateConfig, parent: artifact.Artifact,
              temperature: float, threshold: ThresholdChoice,
              block: metadata_schema.Recalibration) -> Dict[str, Any]:
  """The new artifact's metadata fields (for `saving.save_artifact`): the
  parent's, with the refitted ones and the provenance replaced."""
  replaced = dict(
      name=config.name or parent.metadata.name or artifact.DEFAULT_NAME,
      temperature=temperature,
      threshold=threshold.threshold,
      threshold_source=threshold.source,
      target_accuracy=threshold.target_accuracy,
      parent_model_version=parent.metadata.model_version,
      parent_model_sha256=parent.model_sha256,
      recalibration=block)
  # save_artifact stamps the new artifact's own versions and digest.
  inherited = {name: value
               for name, value in parent.metadata.as_kwargs().items()
               if name not in replaced and
               name not in metadata_schema.STAMPED_FIELDS}
  return {**inherited, **replaced}


def _replace_companions(parent_dir: str, work: str, output: str) -> None:
  """Copies the parent's companion files into `work`; removes any other
  artifact's from `output` (an --overwrite must not leave a foreign
  split.json beside the new model)."""
  for name in _COMPANION_FILES:
    source = FileSystems.join(parent_dir.rstrip("/"), name)
    target = FileSystems.join(output.rstrip("/"), name)
    if FileSystems.exists(source):
      with FileSystems.open(source) as src, open(os.path.join(work, name),
                                                 "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    elif FileSystems.exists(target):
      FileSystems.delete([target])


def _write_split(work: str, parts: SampleParts) -> None:
  held_out = {} if parts.in_sample else {HOLDOUT: parts.holdout.image_ids}
  with open(os.path.join(work, schemas.RECALIBRATION_SPLIT_FILE), "w",
            encoding="utf-8") as f:
    json.dump({FIT: parts.fit.image_ids, **held_out,
               schemas.SPLIT_DHASH_KEY: {
                   name: [split.hash_hex(h) for h in parts.hashes[name]]
                   for name in (FIT, *held_out)}}, f)


def _layer_weights(model) -> Dict[str, List[np.ndarray]]:
  return {layer.name: layer.get_weights() for layer in model.layers
          if not isinstance(layer, TemperatureScaling)}


def _verify_saved(model_dir: str, weights: Dict[str, List[np.ndarray]],
                  images: np.ndarray, calibrated: np.ndarray,
                  batch_size: int) -> None:
  """Reloads the new artifact as scoring will: every weight but the
  temperature must be the parent's, and the predictions the calibrated
  probabilities the report was made from."""
  loaded = artifact.load_artifact(model_dir)
  saved = _layer_weights(loaded.model)
  same = saved.keys() == weights.keys() and all(
      len(saved[name]) == len(weights[name]) and
      all(np.array_equal(a, b) for a, b in zip(saved[name], weights[name]))
      for name in weights)
  actual = loaded.model.predict(images, batch_size=batch_size, verbose=0)
  if not same or not np.allclose(actual, calibrated, atol=1e-4):
    # Without metadata.json the directory no longer passes as an artifact.
    os.remove(os.path.join(model_dir, schemas.METADATA_FILE))
    raise RuntimeError("the saved model.keras is not the parent's model with"
                       " the new temperature")


def _seen_in_training(model_dir: str,
                      sample: data_lib.LabelledData) -> List[str]:
  """A warning when site-sample images are (near-duplicates of) images the
  weights were trained or validated on: the model is surer of those than
  of a new scan, so what is fitted on them flags too few."""
  seen = evaluate.in_training(model_dir, sample.image_ids, sample.images)
  if seen is None or not seen.any():
    return []
  return [f"{int(seen.sum())} of the {len(seen)} site-sample images are"
          " images (or near-duplicates of images) its weights were trained"
          " or validated on: the model is surer of them than of new scans,"
          " so the temperature and threshold fitted here flag too few."
          " Recalibrate on labelled images the model has never seen."]


def recalibrate(config: RecalibrateConfig) -> ArtifactMetadata:
  """Refits temperature and threshold on a site sample; writes a new artifact.

  Args:
    config: the flags.

  Returns:
    The metadata written to the new artifact's metadata.json.

  Raises:
    ValueError: bad flags, paths or data, or an invalid parent artifact
      (artifact.ArtifactError); the message says what to pass.
    RuntimeError: the saved model does not reproduce the parent's weights
      with the new temperature (its metadata.json is then removed).
  """
  config.validate()
  _check_paths(config)
  parent = artifact.load_artifact(config.model)
  labels = parent.labels
  sample, stats = data_lib.load_labelled(config.data, labels,
                                         parent.metadata.image_size,
                                         model_size=True)
  parts = _split_sample(sample, labels, config.holdout_fraction, config.seed)
  _LOG.info("Site sample: %d images, %d to fit on, %d held out", stats.used,
            len(parts.fit.labels),
            0 if parts.in_sample else len(parts.holdout.labels))

  model = parent.model
  parent_temperature = model_lib.temperature_of(model)
  parent_threshold = float(parent.metadata.threshold)
  fit_logits = model_lib.predict_logits(model, parts.fit.images,
                                        config.batch_size)
  holdout_logits = (fit_logits if parts.in_sample else
                    model_lib.predict_logits(model, parts.holdout.images,
                                             config.batch_size))
  temperature = _fit_temperature(fit_logits, parts.fit.labels,
                                 parent_temperature)
  fit_confidence = recipe.confidence(fit_logits, parts.fit.labels,
                               temperature.temperature)
  threshold = _choose_threshold(config, *fit_confidence)
  before = _figures(holdout_logits, parts.holdout.labels, parent_temperature,
                    parent_threshold)
  after = _figures(holdout_logits, parts.holdout.labels,
                   temperature.temperature, threshold.threshold)
  # What no temperature or threshold can fix: the sample's predicted
  # classes (the same with any temperature).
  logits, truth = ((fit_logits, parts.fit.labels) if parts.in_sample else
                   (np.concatenate([fit_logits, holdout_logits]),
                    np.concatenate([parts.fit.labels, parts.holdout.labels])))
  warnings = evaluate.site_warnings(
      "site sample", logits.argmax(axis=1), truth, labels,
      parent.metadata.warnings == (), figures="on them",
      tail="This recalibration cannot fix that: it refitted only the"
      " temperature and the threshold, which change no predicted class;"
      " retrain, or fine-tune on images like these.")
  warnings += _seen_in_training(config.model, sample)
  for warning in warnings:
    _LOG.warning("%s", warning)
  block = _recalibration_block(
      config, parent, stats, parts, temperature, threshold,
      metadata_schema.FlagStats(**calibration.flag_stats(
          *fit_confidence, threshold.threshold)), before, after, warnings)

  weights = _layer_weights(model)
  model_lib.set_temperature(model, temperature.temperature)
  return _write(config, model, parent, parts, weights,
                _metadata(config, parent, model_lib.temperature_of(model),
                          threshold, block), holdout_logits)


def _write(config: RecalibrateConfig, model, parent: artifact.Artifact,
           parts: SampleParts, weights: Dict[str, List[np.ndarray]],
           fields: Dict[str, Any],
           holdout_logits: np.ndarray) -> ArtifactMetadata:
  """Saves the new artifact locally, checks it, copies it if remote."""
  remote = "://" in config.output
  work = tempfile.mkdtemp(prefix="busi-recal-") if remote else config.output
  os.makedirs(work, exist_ok=True)
  # An older artifact in --output stops being one before any file changes.
  old_metadata = FileSystems.join(config.output.rstrip("/"),
                                  schemas.METADATA_FILE)
  if FileSystems.exists(old_metadata):
    FileSystems.delete([old_metadata])
  try:
    _replace_companions(config.model, work, config.output)
    _write_split(work, parts)
    metadata = saving.save_artifact(model, work, parent.labels, **fields)
    _verify_saved(work, weights, parts.holdout.images[:8],
                  calibration.softmax(holdout_logits[:8],
                                      metadata.temperature),
                  config.batch_size)
    if remote:
      saving.copy_artifact(work, config.output)
  finally:
    if remote:
      shutil.rmtree(work, ignore_errors=True)
  return metadata


def _num(value, digits: int = 3) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary(metadata: ArtifactMetadata, output: str) -> str:
  """What recalibrate did, for a person at a terminal."""
  block = metadata.recalibration
  parent, temp, thr = block.parent, block.temperature, block.threshold
  check = block.check
  before, after = check.before, check.after
  held_out = 0 if check.in_sample else check.count
  lines = [
      f"Recalibrated {parent.model_version} on {block.images} site"
      f" images ({temp.fit_count} to fit on, {held_out} held out, seed"
      f" {block.seed}"
      + (f"; {block.unlabelled_skipped} unlabelled skipped"
         if block.unlabelled_skipped else "") + ")",
      f"Temperature {parent.temperature:.4f} → {temp.temperature:.4f}"
      + (f" (NLL on the fit part {temp.nll_parent:.4f} →"
         f" {temp.nll_after:.4f})" if temp.fitted else
         f" (kept: {temp.reason})"),
      f"Threshold {parent.threshold:.4f} → {thr.threshold:.4f} ("
      + ("fixed" if thr.source == schemas.THRESHOLD_FIXED else
         f"target accuracy {thr.target_accuracy:g}, "
         + calibration.rule_words(thr.rule, "the fit part")
         + ("" if thr.target_reached else ", NOT reached")) + ")",
      ("In-sample figures (--holdout_fraction 0: fitted and measured on the"
       f" same {check.count} images, optimistic):" if check.in_sample
       else f"On the {check.count} held-out images:"),
      f"  {'':<24}{'parent':>10}{'new':>10}"]
  for name, old, new in (
      ("ECE", before.ece, after.ece), ("NLL", before.nll, after.nll),
      ("flagged share", before.flagged_share, after.flagged_share),
      ("accuracy, not flagged", before.accuracy_confident,
       after.accuracy_confident),
      ("accuracy, flagged", before.accuracy_flagged, after.accuracy_flagged),
      ("accuracy, all", before.accuracy, after.accuracy)):
    lines.append(f"  {name:<24}{_num(old):>10}{_num(new):>10}")
  lines.append(f"Model {metadata.model_version} written to {output}")
  lines += [f"WARNING: {line}" for line in block.warnings or ()]
  # The parent's training warnings hold for the same weights.
  lines += [f"WARNING: {line}" for line in artifact.training_warning_lines(
      metadata.model_version, metadata.warnings)]
  return "\n".join(lines)
