"""Does a scoring run flag far more images than the model's own data said
it would?

A model's review threshold and its out-of-distribution threshold are
chosen on data like its training data. On scans from another scanner or
site, both can stop meaning what they meant: the threshold's accuracy no
longer holds, and the share of images flagged climbs (issue 12 measured
every scan of another hospital's four scanners flagged). One image cannot
show that; a run can.

At launch `expected` reads from the artifact the share each flag should
mark: for low confidence, the share its threshold flagged on held-out
data; for out of distribution, the detector's design rate (1 − its pass
rate). When the run has finished, `check` compares the run's share with
it. The check is raised when the run's share is both well above the
expected one (by at least `schemas.FLAG_RATE_MARGIN`) and too high to be
chance: a one-sided p-value below `schemas.FLAG_RATE_ALPHA`, which allows
for the held-out share having been measured on a finite number of images
(`upper_tail`). The manifest then says so and the command prints a warning.
A raised check is a prompt to check the model on labelled local data
(`python -m training evaluate`) and to recalibrate it (`python -m training
recalibrate`); a different case mix (a batch of only malignant scans, say)
raises it too.

Only the upper side is checked: a run that flags fewer images than expected
may simply hold easier ones.
"""

import math
from typing import Dict, List, Optional

import numpy as np

import schemas
from schemas.metadata import ArtifactMetadata


def _share(stats) -> Optional[Dict]:
  """{"share", "images"} of a block with flagged_share and count."""
  if stats is None or stats.flagged_share is None or not stats.count:
    return None
  return {schemas.FLAG_RATE_SHARE: float(stats.flagged_share),
          schemas.FLAG_RATE_IMAGES: int(stats.count)}


_NOT_RECORDED = {schemas.FLAG_RATE_SHARE: None,
                 schemas.FLAG_RATE_WHY: "the artifact records no held-out"
                                        " flagged share for its threshold"}


_CV_WARNED = ("its warnings name a fold model that predicted one class,"
              " never predicted one it should, or never learned one: its"
              " pooled share is partly such a model's")


def _low_confidence(metadata: ArtifactMetadata) -> Dict:
  """Where the artifact says how many images its own threshold flags on
  held-out data: a recalibrated artifact's site sample (its check, else its
  fit part: the parent's blocks it keeps speak for the parent's threshold),
  else the pooled cross-validation (unless cv warned of a fold model),
  else its test split, else its validation split. A source passed over
  though it recorded a share is named, with why."""
  recalibration = metadata.recalibration
  if recalibration is not None:
    check = recalibration.check
    found = _share(check.after) if check is not None else None
    if found:
      # in_sample: --holdout_fraction 0 measured it on the fit part itself.
      return {**found,
              schemas.FLAG_RATE_FROM: schemas.FLAG_RATE_FROM_RECALIBRATION,
              schemas.FLAG_RATE_IN_SAMPLE: bool(check.in_sample)}
    found = (_share(recalibration.threshold.fit)
             if recalibration.threshold is not None else None)
    if found:
      return {**found,
              schemas.FLAG_RATE_FROM: schemas.FLAG_RATE_FROM_RECALIBRATION}
    return dict(_NOT_RECORDED)
  # Each image scored by the fold model that did not see it, with its
  # fold's threshold, chosen as the final model's was: on the other folds'
  # out-of-fold predictions (train --threshold_on cv), else on the fold's
  # validation split. Not where the block's warnings say a fold model
  # predicted one class, or never predicted one it should: that share is
  # partly such a model's, and the final model's own splits speak for it
  # better. The entry then says so (passed_over).
  flagging = metadata.flagging
  cross_validation = metadata.cross_validation
  if cross_validation is None:
    pooled = {}
  elif (flagging is not None and flagging.out_of_fold
        and flagging.chosen_on == schemas.THRESHOLD_ON_CV):
    stats = flagging.out_of_fold.pooled
    pooled = ({} if stats is None else
              {"flagged_share": stats.flagged_share, "count": stats.count})
  else:
    pooled = cross_validation.pooled or {}
  passed_over = {}
  if pooled.get("flagged_share") is not None and pooled.get("count"):
    if not cross_validation.warnings:
      return {schemas.FLAG_RATE_SHARE: float(pooled["flagged_share"]),
              schemas.FLAG_RATE_IMAGES: int(pooled["count"]),
              schemas.FLAG_RATE_FROM: schemas.FLAG_RATE_FROM_CROSS_VALIDATION}
    passed_over = {schemas.FLAG_RATE_PASSED_OVER: {
        schemas.FLAG_RATE_FROM_CROSS_VALIDATION: _CV_WARNED}}
  if flagging is not None:
    for split, stats in ((schemas.FLAG_RATE_FROM_TEST, flagging.test),
                         (schemas.FLAG_RATE_FROM_VALIDATION, flagging.val)):
      found = _share(stats)
      if found:
        return {**found, schemas.FLAG_RATE_FROM: split, **passed_over}
  if passed_over:
    return {schemas.FLAG_RATE_SHARE: None,
            schemas.FLAG_RATE_WHY: "the artifact's only held-out flagged"
                                   " share for its threshold, its"
                                   " cross-validation's, was passed over: "
                                   + _CV_WARNED,
            **passed_over}
  return dict(_NOT_RECORDED)


def expected(metadata: ArtifactMetadata, threshold_given: bool,
             ood_threshold_given: bool, has_ood: bool) -> Dict[str, Dict]:
  """The manifest's expectation per flag, fixed at launch.

  Args:
    metadata: the artifact's metadata.
    threshold_given: --threshold overrides the artifact's threshold (its
      held-out share then says nothing about this run's).
    ood_threshold_given: --ood_threshold likewise.
    has_ood: the artifact has an OOD detector.

  Returns:
    {column: {"share": float, "from": ..., "images": ..., and for a
    recalibration sample "in_sample"} or {"share": None, "why": ...}} for
    the low-confidence and out-of-distribution columns; either may add
    "passed_over" ({source: why}: a source that recorded a share and was
    not used).
  """
  out = {}
  if threshold_given:
    out[schemas.COLUMN_LOW_CONFIDENCE] = {
        schemas.FLAG_RATE_SHARE: None,
        schemas.FLAG_RATE_WHY: "--threshold replaces the artifact's threshold"}
  else:
    out[schemas.COLUMN_LOW_CONFIDENCE] = _low_confidence(metadata)
  ood = metadata.ood
  if not has_ood or ood is None:
    out[schemas.COLUMN_OUT_OF_DISTRIBUTION] = {
        schemas.FLAG_RATE_SHARE: None,
        schemas.FLAG_RATE_WHY: "the artifact has no OOD detector"}
  elif ood_threshold_given:
    out[schemas.COLUMN_OUT_OF_DISTRIBUTION] = {
        schemas.FLAG_RATE_SHARE: None,
        schemas.FLAG_RATE_WHY:
            "--ood_threshold replaces the artifact's OOD threshold"}
  elif ood.target_pass_rate is None:
    out[schemas.COLUMN_OUT_OF_DISTRIBUTION] = {
        schemas.FLAG_RATE_SHARE: None,
        schemas.FLAG_RATE_WHY: "the artifact records no OOD pass rate"}
  else:
    # The detector's threshold is set to pass this share of in-distribution
    # images (training/ood_detector.py): its design rate, not a noisy count.
    out[schemas.COLUMN_OUT_OF_DISTRIBUTION] = {
        schemas.FLAG_RATE_SHARE: round(1.0 - float(ood.target_pass_rate), 12),
        schemas.FLAG_RATE_FROM: schemas.FLAG_RATE_FROM_OOD_PASS_RATE}
  return out


_CHUNK = 1 << 16


def upper_tail(k: int, n: int, share: float,
               held_out: Optional[int] = None) -> float:
  """P(X >= k) of a run of n images whose flag has probability `share`.

  With `held_out` = m, the share was itself measured on m images, so it is
  uncertain: X is then beta-binomial, n draws at a probability with the
  Jeffreys posterior Beta(share·m + ½, (1 − share)·m + ½) (the posterior
  predictive p-value); without it, binomial(n, share). Summed exactly in log
  space, term by term from k, stopping once the terms are negligible.
  """
  if not 0 <= k <= n:
    raise ValueError(f"k={k} is outside 0..{n}")
  if k == 0:
    return 1.0
  if held_out:
    a = share * held_out + 0.5
    b = (1.0 - share) * held_out + 0.5
    log_first = (math.lgamma(n + 1) - math.lgamma(k + 1)
                 - math.lgamma(n - k + 1) + math.lgamma(k + a)
                 + math.lgamma(n - k + b) - math.lgamma(n + a + b)
                 - math.lgamma(a) - math.lgamma(b) + math.lgamma(a + b))
    def log_ratios(j):  # log pmf(j+1) / pmf(j)
      return (np.log(n - j) - np.log(j + 1) + np.log(j + a)
              - np.log(n - j - 1 + b))
  else:
    if share <= 0.0:
      return 0.0
    if share >= 1.0:
      return 1.0
    log_first = (math.lgamma(n + 1) - math.lgamma(k + 1)
                 - math.lgamma(n - k + 1) + k * math.log(share)
                 + (n - k) * math.log1p(-share))
    odds = math.log(share) - math.log1p(-share)
    def log_ratios(j):
      return np.log(n - j) - np.log(j + 1) + odds
  top, total, log_term, j = log_first, 0.0, log_first, k
  while True:
    stop = min(n, j + _CHUNK)
    logs = log_term + np.concatenate(
        [[0.0], np.cumsum(log_ratios(np.arange(j, stop, dtype=np.float64)))])
    peak = float(logs.max())
    if peak > top:
      total *= math.exp(top - peak)
      top = peak
    total += float(np.exp(logs - top).sum())
    if stop == n or (logs[-1] < logs[-2] and logs[-1] < top - 50.0):
      break
    # The next chunk starts at term stop + 1 (<= n: term `stop` is in this
    # one, and stop < n).
    log_term = float(logs[-1] + log_ratios(np.float64(stop)))
    j = stop + 1
  return float(min(1.0, math.exp(top) * total))


def check(expectations: Dict[str, Dict], counts: Dict[str, int]) -> Dict:
  """The manifest's "flag_rates": per flag, the run's share against the
  expected one, the p-value and whether the check is raised."""
  images = int(counts.get(schemas.COUNT_PREDICTIONS, 0))
  out = {}
  for column, expectation in expectations.items():
    entry = dict(expectation)
    flagged = counts.get(column)
    entry.update({schemas.FLAG_RATE_IMAGES_SCORED: images,
                  schemas.FLAG_RATE_FLAGGED: flagged})
    share = expectation.get(schemas.FLAG_RATE_SHARE)
    if share is None or flagged is None or not images:
      entry.update({
          schemas.FLAG_RATE_OBSERVED: (None if not images or flagged is None
                                       else flagged / images),
          schemas.FLAG_RATE_P_VALUE: None, schemas.FLAG_RATE_RAISED: False})
      if share is not None:
        entry[schemas.FLAG_RATE_WHY] = "no images scored"
      out[column] = entry
      continue
    observed = flagged / images
    p_value = upper_tail(int(flagged), images, float(share),
                         expectation.get(schemas.FLAG_RATE_IMAGES))
    entry.update({
        schemas.FLAG_RATE_OBSERVED: observed,
        schemas.FLAG_RATE_P_VALUE: p_value,
        # 0.3 - 0.2 is 0.0999...: ten points above is raised.
        schemas.FLAG_RATE_RAISED: bool(
            observed - share >= schemas.FLAG_RATE_MARGIN - 1e-9
            and p_value < schemas.FLAG_RATE_ALPHA)})
    out[column] = entry
  return out


_WHAT = {
    schemas.COLUMN_LOW_CONFIDENCE: "low-confidence",
    schemas.COLUMN_OUT_OF_DISTRIBUTION: "out of distribution",
}
_WHERE = {
    schemas.FLAG_RATE_FROM_RECALIBRATION: "its recalibration sample",
    schemas.FLAG_RATE_FROM_CROSS_VALIDATION: "its held-out cross-validation"
                                             " folds",
    schemas.FLAG_RATE_FROM_TEST: "its test split",
    schemas.FLAG_RATE_FROM_VALIDATION: "its validation split",
    schemas.FLAG_RATE_FROM_OOD_PASS_RATE: "images like its training data,"
                                          " by the detector's design",
}
_ADVICE = {
    schemas.COLUMN_LOW_CONFIDENCE:
        "These images may come from another scanner, site or case mix, where"
        " the model's confidence and threshold may not hold: check it on"
        " labelled local images (python -m training evaluate) and"
        " recalibrate it (python -m training recalibrate).",
    schemas.COLUMN_OUT_OF_DISTRIBUTION:
        "Look at them (the out_of_distribution column): images that are not"
        " breast ultrasound, or scans from another scanner or site; for the"
        " latter check the model on labelled local images (python -m"
        " training evaluate) and recalibrate it (python -m training"
        " recalibrate).",
}


_PASSED_OVER = {
    schemas.FLAG_RATE_FROM_CROSS_VALIDATION:
        "not its held-out cross-validation folds: cv warned of a fold model"
        " there",
}


def passed_over(entry: Dict) -> List[str]:
  """The sources an entry passed over though they recorded a share (by
  their `from` names); [] for none, or for an entry a person edited. The
  manifest keeps each one's why for programs; people read `_PASSED_OVER`'s
  shorter words."""
  found = entry.get(schemas.FLAG_RATE_PASSED_OVER)
  return ([str(source) for source in found] if isinstance(found, dict)
          else [])


def expected_source(entry: Dict) -> str:
  """Where an entry's expected share comes from, as the warnings and the
  run report say it."""
  source = entry.get(schemas.FLAG_RATE_FROM)
  words = (_WHERE.get(source, "its own data") if isinstance(source, str)
           else "its own data")
  notes = (["measured in sample"] if entry.get(schemas.FLAG_RATE_IN_SAMPLE)
           else [])
  notes += [_PASSED_OVER.get(other, f"not {other}")
            for other in passed_over(entry)]
  return words + (f" ({'; '.join(notes)})" if notes else "")


def is_number(value) -> bool:
  """A JSON number (not a boolean): what a hand-edited manifest may lack."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def entries(flag_rates) -> Dict[str, Dict]:
  """The manifest's "flag_rates" entries that are well formed: readers
  (summary, report) get a manifest a person may have edited, or one from a
  partial run, and must not fail on it."""
  if not isinstance(flag_rates, dict):
    return {}
  return {str(column): entry for column, entry in flag_rates.items()
          if isinstance(entry, dict)}


def is_raised(entry: Dict) -> bool:
  """Raised, with the numbers a warning states."""
  return bool(entry.get(schemas.FLAG_RATE_RAISED) is True and all(
      is_number(entry.get(key))
      for key in (schemas.FLAG_RATE_OBSERVED, schemas.FLAG_RATE_SHARE,
                  schemas.FLAG_RATE_P_VALUE, schemas.FLAG_RATE_IMAGES_SCORED)))


def percent(value) -> str:
  """A share as a percentage: whole points, or two significant figures
  below 10 % (a design rate of 0.04 % is not "0 %")."""
  if not is_number(value):
    return "n/a"
  if 0 < value < 0.1:
    return f"{value * 100:.2g}%"
  return f"{value:.0%}"


def p_text(value) -> str:
  """A p-value as the warnings and the summary print it."""
  if not is_number(value):
    return "n/a"
  return "< 1e-300" if value < 1e-300 else f"{value:.2g}"


def warnings(flag_rates) -> List[str]:
  """One sentence per raised check, for the run's summary and log."""
  lines = []
  for column, entry in entries(flag_rates).items():
    if not is_raised(entry):
      continue
    where = expected_source(entry)
    p_value = p_text(entry[schemas.FLAG_RATE_P_VALUE])
    lines.append(
        f"{percent(entry[schemas.FLAG_RATE_OBSERVED])} of the"
        f" {entry[schemas.FLAG_RATE_IMAGES_SCORED]}"
        f" images scored are {_WHAT.get(column, column)}; the model flags"
        f" {percent(entry[schemas.FLAG_RATE_SHARE])} of {where} (one-sided p"
        f" {p_value if p_value.startswith('<') else '= ' + p_value})."
        f" {_ADVICE.get(column, '')}".rstrip())
  return lines
