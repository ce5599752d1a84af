"""The run report: one self-contained HTML page about a scored run.

`python -m beam_pipeline report --predictions DIR --output REPORT_DIR` reads
a run's Parquet with DuckDB SQL and its manifest, draws the plots with
matplotlib (Agg) and writes `REPORT_DIR/index.html`. Plots, Grad-CAM
overlays and thumbnails of the most out-of-distribution images (read back
from the run's TFRecords, `reporting.thumbnails`) are embedded as base64 PNG,
and the page has no script, stylesheet or font from elsewhere, so it can be
mailed or archived as one file.

The module is split the way it is tested: queries → `ReportData`, data →
figure PNG bytes, data → HTML; `main` only parses flags and writes the file.
"""

import argparse
import base64
import dataclasses
import html
import io
import os
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from apache_beam.io.filesystems import FileSystems
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

import schemas
from busi_core import artifact, flag_rates, gcs, output_dirs, spelling
from reporting import run_files, sql, thumbnails

REPORT_FILE = "index.html"
DEFAULT_GALLERY_SIZE = 12
DEFAULT_OOD_THUMBNAILS = 8
STUDIES_SHOWN = 100  # rows of the "Studies" table
HISTOGRAM_BINS = 50
# An overlay is a few hundred KiB at most; a cap keeps one odd file from
# turning the page into something a browser or a mail client chokes on.
MAX_GALLERY_IMAGE_BYTES = 8 * 1024 * 1024

# One colour per class, the same in every plot, so a reader learns it once.
_CLASS_COLOURS = {"normal": "#4c9f70", "benign": "#3b75af",
                  "malignant": "#c8553d"}
_OTHER_COLOUR = "#8c8c8c"
_FLAG_COLOUR = "#d62728"
_FLAGGED_BAR = "#e8a09a"
_CONFIDENT_BAR = "#7a9cc6"


class ClassCount(NamedTuple):
  """Predictions of one class."""
  predicted_class: str
  images: int
  mean_confidence: float


class ErrorCount(NamedTuple):
  """Errors of one stage and type, with one message as an example."""
  stage: str
  error_type: str
  members: int
  example: str


class AccuracyRow(NamedTuple):
  """Accuracy of one group of labelled images (all / confident / flagged)."""
  group: str
  images: int
  correct: int

  @property
  def accuracy(self) -> Optional[float]:
    return self.correct / self.images if self.images else None


class GalleryItem(NamedTuple):
  """One prediction that has a Grad-CAM overlay."""
  source: str
  predicted_class: str
  confidence: float
  low_confidence: bool
  label: Optional[str]
  gradcam_uri: str


class GalleryImage(NamedTuple):
  """A gallery item with its overlay's bytes, or why they could not be read."""
  item: GalleryItem
  data: Optional[bytes]
  problem: Optional[str]


class OodImage(NamedTuple):
  """An out-of-distribution image with its thumbnail's PNG, or why there is
  none."""
  item: sql.OodMember
  data: Optional[bytes]
  problem: Optional[str]


@dataclasses.dataclass(frozen=True)
class ReportData:
  """Everything the page shows, as plain values (no DuckDB objects).

  Attributes:
    run_dir: the run's output directory.
    manifest: manifest.json, or None when the run has none (incomplete).
    total: prediction rows in the Parquet.
    flagged: rows with low_confidence.
    thresholds: the distinct thresholds stored in the rows (normally one).
    per_class: predictions per predicted class, most frequent first.
    histogram: counts of confidence in HISTOGRAM_BINS equal bins over [0, 1].
    errors: errors by stage and type; None when the run has no errors files.
    labels: class order for the confusion matrix (model's, then others seen).
    confusion: (label, predicted_class) → images, over labelled rows only.
    accuracy: all / confident / flagged rows over labelled images.
    gallery: predictions with an overlay, flagged and least confident first.
    gradcam_total: rows with a non-null gradcam_uri.
    review: needs_review and its reasons; None without predictions or when
      the Parquet predates the review columns.
    review_missing: those of sql.REVIEW_COLUMNS the Parquet lacks.
    quality_flags: images per quality flag, most frequent first.
    ood_members: out-of-distribution images, most out of distribution
      first (as many as the report shows).
    studies: the run's studies (rows grouped by study_key), the first
      STUDIES_SHOWN by rank; None without predictions.
  """
  run_dir: str
  manifest: Optional[dict]
  total: int
  flagged: int
  thresholds: Tuple[float, ...]
  per_class: Tuple[ClassCount, ...]
  histogram: Tuple[int, ...]
  errors: Optional[Tuple[ErrorCount, ...]]
  labels: Tuple[str, ...]
  confusion: Mapping[Tuple[str, str], int]
  accuracy: Tuple[AccuracyRow, ...]
  gallery: Tuple[GalleryItem, ...]
  gradcam_total: int
  review: Optional[sql.ReviewCounts] = None
  review_missing: Tuple[str, ...] = ()
  quality_flags: Tuple[sql.FlagCount, ...] = ()
  ood_members: Tuple[sql.OodMember, ...] = ()
  studies: Optional[sql.Studies] = None

  @property
  def labelled(self) -> int:
    return self.accuracy[0].images if self.accuracy else 0


# --------------------------------------------------------------------------
# Queries → data


def _class_order(model_labels: Sequence[str], seen: Sequence[str]
                ) -> Tuple[str, ...]:
  extra = sorted({s for s in seen if s is not None} - set(model_labels))
  return tuple(model_labels) + tuple(extra)


def query_report_data(run_dir: str,
                      gallery_size: int = DEFAULT_GALLERY_SIZE,
                      ood_size: int = DEFAULT_OOD_THUMBNAILS) -> ReportData:
  """Runs the report's SQL over one run's Parquet.

  Args:
    run_dir: a run's output directory (local).
    gallery_size: most Grad-CAM overlays to pick for the gallery.
    ood_size: most out-of-distribution images to pick for thumbnails.

  Returns:
    The values the page shows.
  """
  manifest = run_files.load_manifest(run_dir)
  run = sql.connect(run_dir)
  con = run.con

  def rows(query: str) -> List[tuple]:
    return con.execute(query).fetchall()

  total = flagged = gradcam_total = 0
  thresholds: Tuple[float, ...] = ()
  per_class: List[ClassCount] = []
  histogram = [0] * HISTOGRAM_BINS
  confusion: Dict[Tuple[str, str], int] = {}
  by_flag = {False: (0, 0), True: (0, 0)}
  gallery: List[GalleryItem] = []
  review = None
  review_missing = run.missing(sql.REVIEW_COLUMNS)
  quality_flags: List[sql.FlagCount] = []
  ood_members: List[sql.OodMember] = []
  if run.has_predictions:
    total, flagged, threshold_list = rows(sql.FLAGGED)[0]
    thresholds = tuple(threshold_list or ())
    per_class = [ClassCount(*r) for r in rows(sql.PER_CLASS)]
    for bin_index, n in rows(sql.confidence_histogram(HISTOGRAM_BINS)):
      histogram[max(0, bin_index)] += n
    for label, predicted, n in rows(sql.CONFUSION):
      confusion[(label, predicted)] = n
    for low, n, correct in rows(sql.ACCURACY_BY_FLAG):
      by_flag[bool(low)] = (n, int(correct))
    # Runs written before Grad-CAM existed have no such column.
    if schemas.COLUMN_GRADCAM_URI in run.columns:
      gradcam_total = rows(sql.GRADCAM_COUNT)[0][0]
      gallery = [GalleryItem(*r) for r in con.execute(
          sql.GALLERY, [gallery_size]).fetchall()]
    # Runs written before the OOD detector and quality checks have neither.
    if not review_missing:
      review = sql.ReviewCounts(*rows(sql.REVIEW)[0])
      quality_flags = [sql.FlagCount(*r)
                       for r in rows(sql.QUALITY_FLAG_COUNTS)]
      ood_members = [sql.OodMember(*r) for r in con.execute(
          sql.OOD_MEMBERS, [ood_size]).fetchall()]

  studies = sql.query_studies(run, STUDIES_SHOWN)
  errors = None
  if run.has_errors:
    errors = tuple(ErrorCount(*r) for r in rows(sql.ERRORS_BY_TYPE))

  model_labels = ((manifest or {}).get(schemas.MANIFEST_LABELS)
                  or schemas.LABELS)
  labels = _class_order(
      model_labels, [k[0] for k in confusion] + [k[1] for k in confusion])
  confident, low = by_flag[False], by_flag[True]
  accuracy = ()
  if confident[0] or low[0]:
    accuracy = (
        AccuracyRow("all labelled", confident[0] + low[0],
                    confident[1] + low[1]),
        AccuracyRow("confident", *confident),
        AccuracyRow("flagged (low confidence)", *low),
    )
  return ReportData(
      run_dir=run_dir, manifest=manifest, total=total, flagged=flagged,
      thresholds=thresholds, per_class=tuple(per_class),
      histogram=tuple(histogram), errors=errors, labels=labels,
      confusion=confusion, accuracy=accuracy, gallery=tuple(gallery),
      gradcam_total=gradcam_total, review=review,
      review_missing=review_missing if run.has_predictions else (),
      quality_flags=tuple(quality_flags), ood_members=tuple(ood_members),
      studies=studies)


# --------------------------------------------------------------------------
# Grad-CAM overlays


def resolve_uri(uri: str, run_dir: str) -> str:
  """Where to read an overlay from.

  The pipeline writes overlay URIs under the `--output` it was given, which
  may be a path relative to where it ran; when that does not resolve from
  here, try it relative to the run directory instead.
  """
  if "://" in uri or os.path.isabs(uri) or os.path.exists(uri):
    return uri
  return os.path.join(run_dir, uri)


def image_mime(data: bytes) -> Optional[str]:
  """The MIME type of PNG or JPEG bytes, None for anything else."""
  if data.startswith(b"\x89PNG\r\n\x1a\n"):
    return "image/png"
  if data.startswith(b"\xff\xd8\xff"):
    return "image/jpeg"
  return None


def read_gallery(items: Sequence[GalleryItem], run_dir: str
                ) -> List[GalleryImage]:
  """Reads each overlay through Beam's FileSystems (local or gs://).

  An overlay that cannot be read is kept with the reason, so the page shows
  the gap instead of silently showing fewer images.
  """
  images = []
  for item in items:
    try:
      with FileSystems.open(resolve_uri(item.gradcam_uri, run_dir)) as f:
        data = f.read(MAX_GALLERY_IMAGE_BYTES + 1)
    except OSError as e:  # BeamIOError is an IOError
      images.append(GalleryImage(item, None, f"{type(e).__name__}: {e}"))
      continue
    if len(data) > MAX_GALLERY_IMAGE_BYTES:
      images.append(GalleryImage(
          item, None, f"larger than {MAX_GALLERY_IMAGE_BYTES} bytes"))
    elif image_mime(data) is None:
      images.append(GalleryImage(item, None, "not a PNG or JPEG image"))
    else:
      images.append(GalleryImage(item, data, None))
  return images


def read_ood_images(members: Sequence[sql.OodMember], run_dir: str,
                    manifest: Optional[dict]) -> List[OodImage]:
  """Thumbnails of the out-of-distribution images, from the run's TFRecords
  (see `reporting.thumbnails`); one that cannot be found or read is kept
  with the reason."""
  if not members:
    return []
  found = thumbnails.read_thumbnails(
      [m.image_id for m in members],
      thumbnails.tfrecord_files(run_dir, manifest))
  return [OodImage(m, *found[m.image_id]) for m in members]


# --------------------------------------------------------------------------
# Data → figures (PNG bytes)


def _class_colour(name: str) -> str:
  return _CLASS_COLOURS.get(name, _OTHER_COLOUR)


def _png(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
  return buf.getvalue()


def class_bar_png(per_class: Sequence[ClassCount],
                  labels: Sequence[str] = schemas.LABELS) -> bytes:
  """Bar chart of predictions per class, every model class shown even at 0."""
  counts = {c.predicted_class: c.images for c in per_class}
  names = list(_class_order(labels, list(counts)))
  values = [counts.get(n, 0) for n in names]
  # Figure() rather than pyplot: no global state, no backend selection.
  fig = Figure(figsize=(6, 3.2))
  ax = fig.add_subplot()
  bars = ax.bar(names, values, color=[_class_colour(n) for n in names])
  ax.bar_label(bars, labels=[str(v) for v in values], padding=2)
  ax.set_ylabel("images")
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_title("Predictions per class")
  ax.set_ylim(0, max(values + [1]) * 1.15)
  ax.spines[["top", "right"]].set_visible(False)
  return _png(fig)


def confidence_histogram_png(histogram: Sequence[int],
                             thresholds: Sequence[float]) -> bytes:
  """Histogram of confidence with each threshold as a vertical line."""
  bins = len(histogram)
  width = 1.0 / bins
  lefts = [i * width for i in range(bins)]
  lowest = min([t for t in thresholds] +
               [left for left, n in zip(lefts, histogram) if n] + [1.0])
  fig = Figure(figsize=(8, 3.4))
  ax = fig.add_subplot()
  # A bin is drawn as flagged when it lies wholly below a threshold; with
  # the default 0.9 and 50 bins the bin edges fall on the threshold.
  flagged = [any(left + width <= t + 1e-9 for t in thresholds)
             for left in lefts]
  colours = [_FLAGGED_BAR if f else _CONFIDENT_BAR for f in flagged]
  ax.bar(lefts, histogram, width=width, align="edge", color=colours,
         edgecolor="white", linewidth=0.5)
  handles = [ax.axvline(t, color=_FLAG_COLOUR, linestyle="--", linewidth=1.5,
                        label=f"threshold {t:g}") for t in thresholds]
  if thresholds:
    handles += [Patch(color=_FLAGGED_BAR, label="flagged (below threshold)"),
                Patch(color=_CONFIDENT_BAR, label="confident")]
    # Beside the axes, not inside: bars can be tall anywhere.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False, fontsize=9)
  # Confidence of the top class is never below 1/classes: don't plot the
  # empty left third, but keep every bar and threshold in view.
  ax.set_xlim(max(0.0, lowest - 0.05), 1.0)
  ax.set_ylim(0, max(list(histogram) + [1]) * 1.15)
  ax.set_xlabel("confidence (top-class probability)")
  ax.set_ylabel("images")
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # no half images
  ax.set_title("Confidence")
  ax.spines[["top", "right"]].set_visible(False)
  return _png(fig)


def confusion_matrix_png(labels: Sequence[str],
                         confusion: Mapping[Tuple[str, str], int]) -> bytes:
  """Confusion matrix: rows the known label, columns the prediction.

  Colour is the share of the row (recall), so a small class reads as clearly
  as a big one; the cell text is the count.
  """
  n = len(labels)
  counts = [[confusion.get((t, p), 0) for p in labels] for t in labels]
  shares = [[c / (sum(row) or 1) for c in row] for row in counts]
  size = 1.4 + 0.9 * n
  fig = Figure(figsize=(size + 1.0, size))
  ax = fig.add_subplot()
  im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
  for i in range(n):
    for j in range(n):
      ax.text(j, i, str(counts[i][j]), ha="center", va="center",
              color="white" if shares[i][j] > 0.55 else "#222222",
              fontsize=12)
  ax.set_xticks(range(n), labels, rotation=30, ha="right")
  ax.set_yticks(range(n), labels)
  ax.set_xlabel("predicted")
  ax.set_ylabel("label")
  ax.set_title("Confusion matrix (labelled images)")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of label")
  return _png(fig)


# --------------------------------------------------------------------------
# Data → HTML


def _e(value) -> str:
  return html.escape(str(value), quote=True)


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
  encoded = base64.b64encode(data).decode("ascii")
  return f'<img src="data:{mime};base64,{encoded}" alt="{_e(alt)}">'


def _pct(part: int, whole: int) -> str:
  return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _table(table_id: str, header: Sequence[str],
           body: Sequence[Sequence], numeric: Sequence[int] = ()) -> str:
  head = "".join(f"<th>{_e(h)}</th>" for h in header)
  lines = []
  for row in body:
    cells = "".join(
        f'<td class="num">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
        for i, v in enumerate(row))
    lines.append(f"<tr>{cells}</tr>")
  return (f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead>'
          f"<tbody>{''.join(lines)}</tbody></table>")


def _note(text: str) -> str:
  return f'<p class="note">{_e(text)}</p>'


def _warnings(id_prefix: str, lines: Sequence[str]) -> str:
  """One warning paragraph per line, ids `{id_prefix}-0`, `-1`, ..."""
  return "".join(f'<p class="warning" id="{id_prefix}-{i}">{_e(line)}</p>'
                 for i, line in enumerate(lines))


def _section(section_id: str, title: str, body: str) -> str:
  return (f'<section id="{_e(section_id)}"><h2>{_e(title)}</h2>'
          f"{body}</section>")


def _run_section(data: ReportData) -> str:
  m = data.manifest
  if m is None:
    return _section("run", "Run", _note(
        f"No {schemas.MANIFEST_FILE} in {data.run_dir}: the run did not"
        " finish, so the counts below may be partial."))
  facts = [
      ("run id", m.get(schemas.MANIFEST_RUN_ID)),
      ("command", m.get(schemas.MANIFEST_COMMAND)),
      ("model version", m.get(schemas.MANIFEST_MODEL_VERSION)),
      ("threshold", m.get(schemas.MANIFEST_THRESHOLD)),
      ("image size", m.get(schemas.MANIFEST_IMAGE_SIZE)),
      ("inputs", ", ".join(map(str, m.get(schemas.MANIFEST_INPUTS) or []))),
      ("started", m.get(schemas.MANIFEST_STARTED_AT)),
      ("finished", m.get(schemas.MANIFEST_FINISHED_AT)),
      ("wall time (s)", m.get(schemas.MANIFEST_WALL_TIME_S)),
      ("throughput (images/s)", m.get(schemas.MANIFEST_THROUGHPUT)),
  ]
  facts_html = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>"
                       for k, v in facts if v not in (None, ""))
  counts = m.get(schemas.MANIFEST_COUNTS) or {}
  counts_table = _table("counts", ["count", "value"],
                        sorted(counts.items()), numeric=(1,))
  invariant = m.get(schemas.MANIFEST_INVARIANT) or {}
  holds = invariant.get(schemas.INVARIANT_HOLDS)
  badge = ('<span class="badge ok">holds</span>' if holds
           else '<span class="badge bad">BROKEN</span>')
  check = ""
  # The manifest counts what the pipeline meant to write; the Parquet is what
  # is on disk. Different numbers mean lost or extra files.
  predictions = counts.get(schemas.COUNT_PREDICTIONS)
  if predictions is not None and predictions != data.total:
    check = _note(f"manifest says {predictions} predictions, the"
                  f" Parquet holds {data.total} rows.")
  warnings = _warnings("model-warning", artifact.run_warning_lines(m))
  body = (f'{warnings}<div class="cols"><table id="facts" class="facts">'
          f"{facts_html}</table>{counts_table}</div>"
          f'<p class="invariant">'
          f'{_e(invariant.get(schemas.INVARIANT_RULE, "invariant"))}: '
          f"{badge}</p>{check}")
  return _section("run", "Run", body)


def _classes_section(data: ReportData, figures: Mapping[str, bytes]) -> str:
  if not data.total:
    return _section("classes", "Predictions per class",
                    _note("No predictions in this run."))
  table = _table(
      "per-class", ["predicted class", "images", "share", "mean confidence"],
      [(c.predicted_class, c.images, _pct(c.images, data.total),
        f"{c.mean_confidence:.3f}") for c in data.per_class],
      numeric=(1, 2, 3))
  body = (f'<div class="cols"><div class="plot">'
          f'{_img(figures["classes"], "predictions per class")}</div>'
          f"{table}</div>")
  return _section("classes", "Predictions per class", body)


def _confidence_section(data: ReportData,
                        figures: Mapping[str, bytes]) -> str:
  if not data.total:
    return _section("confidence", "Confidence",
                    _note("No predictions in this run."))
  thresholds = ", ".join(f"{t:g}" for t in data.thresholds)
  share = (f'<p class="big"><span id="low-confidence-share">'
           f"{_e(_pct(data.flagged, data.total))}</span> low confidence: "
           f"{data.flagged} of {data.total} images below threshold "
           f"{_e(thresholds)}, flagged for review.</p>")
  plot = (f'<div class="plot">{_img(figures["confidence"], "confidence")}'
          f"</div>")
  return _section("confidence", "Confidence",
                  share + _flag_rates_notes(data.manifest) + plot)


def _flag_rates_notes(manifest: Optional[dict]) -> str:
  """What the run's flagged shares were checked against
  (busi_core.flag_rates), and a warning per raised check."""
  rates = flag_rates.entries((manifest or {}).get(
      schemas.MANIFEST_FLAG_RATES))
  low = rates.get(schemas.COLUMN_LOW_CONFIDENCE) or {}
  notes = []
  share = low.get(schemas.FLAG_RATE_SHARE)
  if flag_rates.is_number(share):
    images = low.get(schemas.FLAG_RATE_IMAGES)
    counted = f" ({images} images)" if isinstance(images, int) else ""
    notes.append(_note(
        f"For comparison, the model flags {flag_rates.percent(share)}"
        f" of {flag_rates.expected_source(low)}{counted}."))
  elif low:
    notes.append(_note("The low-confidence share was not checked against"
                       f" the model's:"
                       f" {low.get(schemas.FLAG_RATE_WHY) or 'not recorded'}."))
  notes.append(_warnings("flag-rate-warning", flag_rates.warnings(rates)))
  return "".join(notes)


def _review_table(review: sql.ReviewCounts) -> str:
  total = review.images

  def row(reason: str, count: int, recorded: bool = True) -> tuple:
    return ((reason, count, _pct(count, total)) if recorded
            else (reason, "n/a", "n/a"))

  return _table("review", ["reason", "images", "share"], [
      row("needs review", review.needs_review),
      row("low confidence", review.low_confidence),
      row("out of distribution", review.out_of_distribution,
          bool(review.ood_scored)),
      row("any quality flag", review.quality_flagged,
          bool(review.quality_checked)),
  ], numeric=(1, 2))


def _review_notes(data: ReportData) -> str:
  notes = data.review.notes()
  ood_threshold = (data.manifest or {}).get(schemas.MANIFEST_OOD_THRESHOLD)
  if data.review.ood_scored and ood_threshold is not None:
    notes.insert(0, f"Out of distribution: ood_score above"
                    f" {ood_threshold:g}.")
  return "".join(_note(n) for n in notes)


def _quality_flags_html(data: ReportData) -> str:
  if not data.review.quality_checked:
    return ""
  if not data.quality_flags:
    body = _note("No image has a quality flag.")
  else:
    body = _table("quality-flags", ["flag", "images", "share"],
                  [(f.flag, f.images, _pct(f.images, data.total))
                   for f in data.quality_flags], numeric=(1, 2))
  return f"<h3>Quality flags</h3>{body}"


def _ood_gallery_html(data: ReportData, ood_images: Sequence[OodImage]) -> str:
  review = data.review
  if not review.ood_scored:
    return ""
  if not review.out_of_distribution:
    return ("<h3>Most out of distribution</h3>"
            + _note("No image is out of distribution."))
  cards = []
  for o in ood_images:
    it = o.item
    if o.data is not None:
      picture = _img(o.data, f"thumbnail of {it.source}")
    else:
      picture = f'<div class="missing">{_e(o.problem)}</div>'
    cards.append(
        f"<figure>{picture}<figcaption>"
        f'<span class="source" title="{_e(it.source)}">{_e(it.source)}</span>'
        f"<br><b>{_e(it.predicted_class)}</b> {it.confidence:.3f}"
        f" · ood_score {it.ood_score:.3g}</figcaption></figure>")
  shown = (f"<p>{len(ood_images)} of {review.out_of_distribution}"
           " out-of-distribution images, most out of distribution first"
           " (pixels from the run's TFRecords).</p>")
  return ("<h3>Most out of distribution</h3>" + shown
          + f'<div class="gallery" id="ood-gallery">{"".join(cards)}</div>')


def _review_section(data: ReportData,
                    ood_images: Sequence[OodImage]) -> str:
  if not data.total:
    body = _note("No predictions in this run.")
  elif data.review is None:
    body = _note("Not recorded: this run's predictions were written before"
                 f" the {', '.join(data.review_missing)} columns.")
  else:
    review = data.review
    body = (f'<p class="big"><span id="needs-review-share">'
            f"{_e(_pct(review.needs_review, review.images))}</span> need"
            f" review: {review.needs_review} of {review.images} images are"
            " low confidence, out of distribution or have a quality"
            f" flag.</p>{_review_table(review)}{_review_notes(data)}"
            f"{_quality_flags_html(data)}"
            f"{_ood_gallery_html(data, ood_images)}")
  return _section("review", "Review", body)


def _has_studies_section(data: ReportData) -> bool:
  """A section when rows are grouped by study, or DICOM images were scored
  without a key; none for a run with neither (PNG and JPEG images, or a
  run written before the study columns)."""
  studies = data.studies
  return bool(studies and (studies.totals.studies or studies.absent_note()))


def _study_key_cell(key: str) -> str:
  """The key's first hex digits, the whole key in the title; a value that
  is not a key is never shown, in part or whole."""
  full = sql.shown_key(key)
  if full is None:
    return f"<td>{_e(sql.INVALID_KEY)}</td>"
  return (f'<td class="key" title="{_e(full)}"><code>'
          f"{_e(sql.short_key(key))}</code>&hellip;</td>")


def _studies_table(studies: sql.Studies) -> str:
  header = ["study", "images", "frames", "series", "needs review"]
  if studies.ranked_by_malignant:
    header += [f"max {sql.P_MALIGNANT}", "predicted class at max"]
  lines = []
  for s in studies.top:
    review = (f"yes ({s.review_images})" if s.needs_review else "no")
    cells = [_study_key_cell(s.study_key),
             f'<td class="num">{s.images}</td>',
             f'<td class="num">{s.frames}</td>',
             f'<td class="num">{s.series}</td>',
             f"<td>{_e(review)}</td>"]
    if studies.ranked_by_malignant:
      cells += [f'<td class="num">{s.max_p_malignant:.3f}</td>',
                f"<td>{_e(s.class_at_max)}</td>"]
    lines.append(f"<tr>{''.join(cells)}</tr>")
  head = "".join(f"<th>{_e(h)}</th>" for h in header)
  return (f'<table id="studies"><thead><tr>{head}</tr></thead>'
          f"<tbody>{''.join(lines)}</tbody></table>")


def _studies_section(data: ReportData) -> str:
  studies = data.studies
  absent = studies.absent_note()
  if absent:
    return _section("studies", "Studies", _note(absent))
  totals = studies.totals
  order = (f"highest {sql.P_MALIGNANT} first" if studies.ranked_by_malignant
           else "most images needing review first")
  shown = (f"<p>{len(studies.top)} of {totals.studies} studies, {order};"
           f" a study is shown by the first {sql.SHORT_KEY_CHARS} hex"
           " digits of its study_key (the whole key on hover).</p>")
  more = (f"<p>&hellip; and {studies.more} more.</p>" if studies.more
          else "")
  body = (f'<p class="big" id="studies-headline">'
          f"{_e(studies.headline())}</p>"
          f"{''.join(_note(n) for n in studies.notes())}"
          f"{shown}{_studies_table(studies)}{more}")
  return _section("studies", "Studies", body)


def _errors_section(data: ReportData) -> str:
  if data.errors is None:
    body = _note(f"No errors table ({schemas.ERRORS_DIR}/ is missing or"
                 " empty).")
  elif not data.errors:
    body = _note("No errors: every member was scored or skipped as a mask.")
  else:
    total = sum(e.members for e in data.errors)
    body = _table(
        "errors", ["stage", "error type", "members", "example message"],
        [(e.stage, e.error_type, e.members, (e.example or "")[:200])
         for e in data.errors], numeric=(2,))
    body = (f"<p>{total} member{'s' if total != 1 else ''} failed.</p>"
            + body)
  return _section("errors", "Errors by stage and type", body)


def _labels_section(data: ReportData, figures: Mapping[str, bytes]) -> str:
  if not data.labelled:
    return _section("labels", "Against known labels", _note(
        "No labelled images (no class folder in the sources), so accuracy"
        " cannot be measured."))
  table = _table(
      "accuracy", ["group", "images", "correct", "accuracy"],
      [(a.group, a.images, a.correct,
        "n/a" if a.accuracy is None else f"{a.accuracy:.3f}")
       for a in data.accuracy], numeric=(1, 2, 3))
  body = (f"<p>{data.labelled} of {data.total} images carry a label.</p>"
          f'<div class="cols"><div class="plot">'
          f'{_img(figures["confusion"], "confusion matrix")}</div>'
          f"{table}</div>")
  return _section("labels", "Against known labels", body)


def _gallery_section(data: ReportData,
                     gallery: Sequence[GalleryImage]) -> str:
  cards = []
  for g in gallery:
    it = g.item
    if g.data is not None:
      picture = _img(g.data, f"Grad-CAM of {it.source}", image_mime(g.data))
    else:
      picture = f'<div class="missing">{_e(g.problem)}</div>'
    flag = (' <span class="badge bad">flagged</span>'
            if it.low_confidence else "")
    label = ""
    if it.label:
      verdict = ('<span class="right">right</span>'
                 if it.label == it.predicted_class
                 else '<span class="wrong">wrong</span>')
      label = f"<br>label: {_e(it.label)} · {verdict}"
    cards.append(
        f"<figure>{picture}<figcaption>"
        f'<span class="source" title="{_e(it.source)}">{_e(it.source)}</span>'
        f"<br><b>{_e(it.predicted_class)}</b> {it.confidence:.3f}{flag}"
        f"{label}</figcaption></figure>")
  shown = (f"<p>{len(gallery)} of {data.gradcam_total} overlays, flagged and"
           f" least confident first.</p>")
  return _section("gallery", "Grad-CAM overlays",
                  shown + f'<div class="gallery">{"".join(cards)}</div>')


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,
sans-serif;margin:0;background:#f4f5f7;color:#222;font-size:15px}
header{background:#27364a;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d3e0;font-size:13px;word-break:break-all}
nav{padding:8px 32px;background:#fff;border-bottom:1px solid #dde1e6}
nav a{margin-right:18px;color:#3b75af;text-decoration:none;font-size:14px}
main{max-width:1180px;margin:0 auto;padding:8px 24px 40px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;
margin:18px 0;padding:12px 22px 18px}
h2{font-size:18px;margin:6px 0 12px;color:#27364a}
table{border-collapse:collapse;margin:6px 0;font-size:14px}
th,td{border-bottom:1px solid #e6e8eb;padding:5px 12px;text-align:left;
vertical-align:top}
thead th{background:#f0f2f5}
table.facts th{font-weight:600;color:#555;white-space:nowrap}
table.facts td{word-break:break-all}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.key{white-space:nowrap}
.cols{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
.cols>table.facts{flex:1 1 480px}
.plot img{max-width:100%;height:auto}
.note{color:#666;font-style:italic}
.warning{color:#8a1c12;background:#fdecea;border-left:4px solid #c0392b;padding:.4em .6em}
.big{font-size:17px}
#low-confidence-share,#needs-review-share{font-size:26px;font-weight:700;
color:#c8553d}
h3{font-size:15px;margin:16px 0 8px;color:#27364a}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;
font-size:12px;font-weight:700;color:#fff}
.badge.ok{background:#4c9f70}.badge.bad{background:#c8553d}
.gallery{display:grid;grid-template-columns:repeat(4,1fr);gap:14px}
figure{margin:0;border:1px solid #e6e8eb;border-radius:4px;padding:6px;
background:#fafbfc}
figure img{width:100%;height:auto;display:block;image-rendering:auto}
figcaption{font-size:12px;margin-top:5px;line-height:1.5}
figcaption .source{color:#555;word-break:break-all}
.right{color:#2e7d4f;font-weight:600}.wrong{color:#b3402a;font-weight:600}
.missing{aspect-ratio:1;display:flex;align-items:center;justify-content:center;
text-align:center;color:#a33;background:#f6e9e7;font-size:12px;padding:8px}
"""


# The page's pieces, for other pages in the same look (reporting.compare).
CSS = _CSS
escape = _e
html_table = _table
html_section = _section
html_warnings = _warnings


def render_html(data: ReportData, figures: Mapping[str, bytes],
                gallery: Sequence[GalleryImage] = (),
                ood_images: Sequence[OodImage] = ()) -> str:
  """The whole page.

  Args:
    data: from `query_report_data`.
    figures: PNG bytes by name: "classes" and "confidence" when there are
      predictions, "confusion" when some are labelled.
    gallery: from `read_gallery`; no section when empty.
    ood_images: from `read_ood_images`, shown in the review section.

  Returns:
    A self-contained HTML document; every value from the data is escaped.
  """
  run_id = ((data.manifest or {}).get(schemas.MANIFEST_RUN_ID)
            or os.path.basename(os.path.normpath(data.run_dir)))
  sections = [
      _run_section(data),
      _classes_section(data, figures),
      _confidence_section(data, figures),
      _review_section(data, ood_images),
  ]
  nav = [("run", "Run"), ("classes", "Classes"), ("confidence", "Confidence"),
         ("review", "Review")]
  if _has_studies_section(data):
    sections.append(_studies_section(data))
    nav.append(("studies", "Studies"))
  sections += [_errors_section(data), _labels_section(data, figures)]
  nav += [("errors", "Errors"), ("labels", "Labels")]
  if gallery:
    sections.append(_gallery_section(data, gallery))
    nav.append(("gallery", "Grad-CAM"))
  nav_html = "".join(f'<a href="#{i}">{_e(t)}</a>' for i, t in nav)
  model = (data.manifest or {}).get(schemas.MANIFEST_MODEL_VERSION)
  subtitle = f"{data.run_dir}" + (f" · model {model}" if model else "")
  return (
      "<!DOCTYPE html>\n"
      '<html lang="en"><head><meta charset="utf-8">'
      '<meta name="viewport" content="width=device-width, initial-scale=1">'
      f"<title>BUSI run report {_e(run_id)}</title>"
      f"<style>{_CSS}</style></head><body>"
      f"<header><h1>BUSI run report · {_e(run_id)}</h1>"
      f"<p>{_e(subtitle)}</p></header>"
      f"<nav>{nav_html}</nav><main>{''.join(sections)}</main>"
      "</body></html>\n")


def figures_for(data: ReportData) -> Dict[str, bytes]:
  """Draws the plots the data supports (none for an empty run)."""
  figures = {}
  if data.total:
    figures["classes"] = class_bar_png(data.per_class, data.labels)
    figures["confidence"] = confidence_histogram_png(data.histogram,
                                                     data.thresholds)
  if data.labelled:
    figures["confusion"] = confusion_matrix_png(data.labels, data.confusion)
  return figures


def build_report(run_dir: str,
                 gallery_size: int = DEFAULT_GALLERY_SIZE,
                 ood_size: int = DEFAULT_OOD_THUMBNAILS) -> str:
  """Queries, draws and renders the report of one run; returns the HTML.

  Args:
    run_dir: the run's output directory, local or gs:// (its Parquet and
      manifest are copied to a temporary directory for the queries).
    gallery_size: most Grad-CAM overlays to show.
    ood_size: most out-of-distribution thumbnails to show.

  Raises:
    run_files.RunDirError: no run in `run_dir`.
  """
  with run_files.opened(run_dir, "--predictions") as files:
    data = dataclasses.replace(
        query_report_data(files.local, gallery_size, ood_size),
        run_dir=run_dir)
  return render_html(
      data, figures_for(data), read_gallery(data.gallery, run_dir),
      read_ood_images(data.ood_members, run_dir, data.manifest))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m beam_pipeline report",
      description="Writes REPORT_DIR/index.html: one self-contained page"
                  " about a scored run.",
      allow_abbrev=False)
  parser.add_argument("--predictions", required=True, metavar="DIR",
                      help="A run's output directory (local or gs://).")
  parser.add_argument("--output", required=True, metavar="REPORT_DIR",
                      help="Directory to write index.html into (local).")
  parser.add_argument("--gallery_size", type=int,
                      default=DEFAULT_GALLERY_SIZE,
                      help="Most Grad-CAM overlays to show.")
  parser.add_argument("--ood_thumbnails", type=int,
                      default=DEFAULT_OOD_THUMBNAILS,
                      help="Most out-of-distribution images to show, read"
                           " from the run's TFRecords (local or gs://).")
  args = spelling.parse_args(parser, argv)
  if args.gallery_size < 0:
    parser.error("--gallery_size must be >= 0")
  if args.ood_thumbnails < 0:
    parser.error("--ood_thumbnails must be >= 0")
  output_dirs.check_is_directory(args.output)  # before the run is read
  gcs.configure_for_emulator()
  page = build_report(args.predictions, args.gallery_size,
                      args.ood_thumbnails)
  os.makedirs(args.output, exist_ok=True)
  path = os.path.join(args.output, REPORT_FILE)
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  print(path)
  return 0
