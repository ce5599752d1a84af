"""The run report: SQL → data, data → figures, data → HTML, and the page
as a browser draws it (headless Chromium screenshot)."""

import base64
import datetime
import html
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
from typing import Dict, List, NamedTuple, Optional, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import schemas
from busi_core import gcs
from reporting import report, run_files, sql, thumbnails
from reporting.sql import predictions_glob
from tests.conftest import BUCKET
from training import testing as training_testing

RUN_ID = "20260101T000000Z-abcdef01"
MODEL_VERSION = "busi-vgg16-test"
THRESHOLD = 0.9
EVIL_SOURCE = "evil.zip!/<script>alert('x')</script>.png"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OOD_THRESHOLD = 5.0
# Out of distribution, the more so the later; row 14's pixels are left out
# of the TFRecords, so its thumbnail is a gap.
OOD_ROWS = (0, 7, 14, 21, 28, 35)
NO_THUMBNAIL_ROW = 14
NULL_OOD_ROWS = (4, 13, 22, 31)  # no ood_score (as a run without a detector)
QUALITY_FLAGS = ("", "colour", "blank,low_contrast", None)


def _overlay_png(size: int = 48) -> bytes:
  y, x = np.mgrid[0:size, 0:size]
  rgb = np.stack([x * 255 // size, y * 255 // size,
                  np.full_like(x, 128)], axis=-1).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="PNG")
  return buf.getvalue()


def _pixels(i: int) -> np.ndarray:
  """Row i's image: small, distinct, and not grey, so channel order shows."""
  rng = np.random.default_rng(1000 + i)
  return rng.integers(0, 256, size=(16, 12, 3), dtype=np.uint8)


def _image_id(i: int) -> str:
  return training_testing.make_record(_pixels(i), "").image_id


def _prediction_rows(n: int, overlay_uri: str, missing_uri: str) -> List[Dict]:
  rng = np.random.default_rng(0)
  labels = schemas.LABELS
  rows = []
  scored_at = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
  for i in range(n):
    probs = rng.dirichlet([1.0, 1.0, 1.0] if i % 3 else [8.0, 0.5, 0.5])
    probs = np.roll(probs, i % 3)
    top = int(np.argmax(probs))
    low_confidence = bool(probs[top] < THRESHOLD)
    ood_score = (None if i in NULL_OOD_ROWS else
                 10.0 + i if i in OOD_ROWS else float(rng.uniform(0, 4)))
    out_of_distribution = (None if ood_score is None else
                           ood_score > OOD_THRESHOLD)
    flags = QUALITY_FLAGS[i % len(QUALITY_FLAGS)]
    row = {
        "image_id": _image_id(i),
        "source": f"data.zip!/Dataset_BUSI_with_GT/{labels[i % 3]}/{i}.png",
        # Two thirds labelled, from the folder; the rest unknown.
        "label": labels[i % 3] if i % 3 != 2 or i < 12 else None,
        "predicted_class": labels[top],
        "confidence": float(probs[top]),
        schemas.COLUMN_LOW_CONFIDENCE: low_confidence,
        "threshold": THRESHOLD,
        "model_version": MODEL_VERSION,
        "run_id": RUN_ID,
        "scored_at": scored_at,
        "gradcam_uri": None,
        schemas.COLUMN_OOD_SCORE: ood_score,
        schemas.COLUMN_OUT_OF_DISTRIBUTION: out_of_distribution,
        schemas.COLUMN_QUALITY_FLAGS: flags,
        schemas.COLUMN_NEEDS_REVIEW: bool(
            low_confidence or out_of_distribution or flags),
    }
    for label, p in zip(labels, probs):
      row[schemas.probability_column(label)] = float(p)
    rows.append(row)
  # Sources reach the page through the gallery captions.
  rows[1]["source"] = EVIL_SOURCE
  rows[1]["gradcam_uri"] = overlay_uri
  rows[2]["gradcam_uri"] = missing_uri
  return rows


def _write_table(path, rows, schema):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _write_tfrecords(path: str, rows: List[Dict],
                     indices: Sequence[int]) -> str:
  """Rows' images as one TFRecord shard, as preprocessing writes them."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return training_testing.write_tfrecords(path, [
      training_testing.make_record(_pixels(i), rows[i]["label"] or "",
                                   rows[i]["source"]) for i in indices])


def _write_run(run_dir, n: int = 36, with_errors: bool = True,
               tfrecords: bool = True) -> str:
  """A scored run's outputs in `run_dir`, as the pipeline lays them out;
  `tfrecords`: with DIR/tfrecords/ (as `run` writes) missing one image."""
  run_dir = str(run_dir)
  overlay = os.path.join(run_dir, schemas.GRADCAM_DIR, "id001.png")
  os.makedirs(os.path.dirname(overlay), exist_ok=True)
  with open(overlay, "wb") as f:
    f.write(_overlay_png())
  missing = os.path.join(run_dir, schemas.GRADCAM_DIR, "gone.png")
  rows = _prediction_rows(n, overlay, missing) if n else []
  _write_table(os.path.join(run_dir, schemas.PREDICTIONS_DIR,
                            "part-00000-of-00001.parquet"),
               rows, schemas.predictions_schema(schemas.LABELS))
  errors = [
      {"source": "data.zip!/a.png", "stage": "decode",
       "error_type": "CorruptImage", "message": "bad png",
       "run_id": RUN_ID},
      {"source": "data.zip!/b.png", "stage": "decode",
       "error_type": "CorruptImage", "message": "bad png", "run_id": RUN_ID},
      {"source": "other.zip", "stage": "read", "error_type": "BadZipFile",
       "message": "not a <b>zip</b>", "run_id": RUN_ID},
  ]
  if with_errors:
    _write_table(os.path.join(run_dir, schemas.ERRORS_DIR,
                              "part-00000-of-00001.parquet"),
                 errors, schemas.errors_schema())
  if tfrecords:
    _write_tfrecords(os.path.join(
        run_dir, schemas.TFRECORD_DIR,
        "part-00000-of-00001" + schemas.TFRECORD_SUFFIX), rows,
        [i for i in range(n) if i != NO_THUMBNAIL_ROW])
  n_errors = len(errors) if with_errors else 0
  flagged = sum(r["low_confidence"] for r in rows)
  manifest = {
      "run_id": RUN_ID, "command": "run", "inputs": ["data.zip"],
      "model_version": MODEL_VERSION, "threshold": THRESHOLD,
      "ood_threshold": OOD_THRESHOLD,
      "labels": list(schemas.LABELS),
      "counts": {"members_seen": n + 5 + n_errors, "predictions": n,
                 "masks_skipped": 5, "errors": n_errors,
                 "low_confidence": flagged, "images_written": n},
      "invariant": {"rule": "members_seen = predictions + masks_skipped"
                            " + errors", "holds": True},
      "wall_time_s": 1.5,
  }
  with open(os.path.join(run_dir, schemas.MANIFEST_FILE), "w") as f:
    json.dump(manifest, f)
  return run_dir


class _Page(html.parser.HTMLParser):
  """Collects tables (by id) as rows of cell text, images and section ids."""

  def __init__(self):
    super().__init__()
    self.tables: Dict[str, List[List[str]]] = {}
    self.images: List[str] = []
    self.sections: List[str] = []
    self.tags: List[str] = []
    self._table = None
    self._cell = None

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags.append(tag)
    if tag == "table" and attrs.get("id"):
      self._table = self.tables.setdefault(attrs["id"], [])
    elif tag == "tr" and self._table is not None:
      self._table.append([])
    elif tag in ("td", "th") and self._table is not None:
      self._cell = []
    elif tag == "img":
      self.images.append(attrs["src"])
    elif tag == "section":
      self.sections.append(attrs["id"])

  def handle_endtag(self, tag):
    if tag == "table":
      self._table = None
    elif tag in ("td", "th") and self._cell is not None:
      self._table[-1].append("".join(self._cell))
      self._cell = None

  def handle_data(self, data):
    if self._cell is not None:
      self._cell.append(data)


def _parse(page: str) -> _Page:
  parsed = _Page()
  parsed.feed(page)
  return parsed


def _make_report(run_dir, out_dir, capsys) -> str:
  assert report.main(["--predictions", str(run_dir),
                      "--output", str(out_dir)]) == 0
  path = os.path.join(str(out_dir), report.REPORT_FILE)
  assert capsys.readouterr().out.strip() == path
  with open(path, encoding="utf-8") as f:
    return f.read()


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
  """(run_dir, report_dir, html) of the 36-row run, built once."""
  base = tmp_path_factory.mktemp("report")
  run_dir = _write_run(base / "run")
  out_dir = base / "report"
  assert report.main(["--predictions", run_dir, "--output", str(out_dir)]) == 0
  with open(out_dir / report.REPORT_FILE, encoding="utf-8") as f:
    return run_dir, str(out_dir), f.read()


def test_report_sections_numbers_and_images(full_report):
  run_dir, _, page = full_report
  parsed = _parse(page)
  assert parsed.sections == ["run", "classes", "confidence", "review",
                             "errors", "labels", "gallery"]
  con = duckdb.connect()
  preds = con.read_parquet(predictions_glob(run_dir))
  preds.create_view("p")

  per_class = {r[0]: r[1:3] for r in parsed.tables["per-class"][1:]}
  expected = con.execute("SELECT predicted_class, count(*) FROM p"
                         " GROUP BY ALL").fetchall()
  assert {k: int(v[0]) for k, v in per_class.items()} == dict(expected)

  total, flagged = con.execute(
      "SELECT count(*), count(*) FILTER (WHERE low_confidence) FROM p"
  ).fetchone()
  assert 0 < flagged < total
  assert f"{100 * flagged / total:.1f}%" in page
  assert f"{flagged} of {total} images below threshold 0.9" in page

  accuracy = {r[0]: r[1:] for r in parsed.tables["accuracy"][1:]}
  for group, where in (("all labelled", "true"),
                       ("confident", "NOT low_confidence"),
                       ("flagged (low confidence)", "low_confidence")):
    n, correct = con.execute(
        f"SELECT count(*), sum((predicted_class = label)::INT) FROM p"
        f" WHERE label IS NOT NULL AND {where}").fetchone()
    assert accuracy[group][:2] == [str(n), str(correct)], group

  errors = {(r[0], r[1]): int(r[2]) for r in parsed.tables["errors"][1:]}
  assert errors == {("decode", "CorruptImage"): 2, ("read", "BadZipFile"): 1}

  facts = dict(parsed.tables["facts"])
  assert facts["run id"] == RUN_ID and facts["model version"] == MODEL_VERSION
  counts = dict(parsed.tables["counts"][1:])
  assert counts["predictions"] == str(total)
  assert "holds" in page


def test_report_is_self_contained_and_embeds_pngs(full_report):
  run_dir, _, page = full_report
  parsed = _parse(page)
  # Bar chart, histogram, confusion matrix, one overlay, five thumbnails; the
  # missing overlay and thumbnail are text placeholders, not broken <img>s.
  assert len(parsed.images) == 4 + len(OOD_ROWS) - 1
  for src in parsed.images:
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
  with open(os.path.join(run_dir, schemas.GRADCAM_DIR, "id001.png"),
            "rb") as f:
    overlay = base64.b64encode(f.read()).decode()
  assert f"data:image/png;base64,{overlay}" in page
  assert "gone.png" in page  # the unreadable overlay says why
  assert "script" not in parsed.tags
  assert not set(parsed.tags) & {"link", "iframe", "object", "embed"}
  assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_report_escapes_text_from_the_data(full_report):
  _, _, page = full_report
  assert "<script>" not in page and "<b>zip</b>" not in page
  assert html.escape(EVIL_SOURCE, quote=True) in page
  assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
  assert "not a &lt;b&gt;zip&lt;/b&gt;" in page


def test_empty_run_without_errors_still_renders(tmp_path, capsys):
  run_dir = _write_run(tmp_path / "run", n=0, with_errors=False)
  page = _make_report(run_dir, tmp_path / "report", capsys)
  parsed = _parse(page)
  assert parsed.sections == ["run", "classes", "confidence", "review",
                             "errors", "labels"]
  assert "No predictions in this run." in page
  assert "No errors table" in page
  assert "No labelled images" in page
  assert parsed.images == []


def test_run_without_manifest_or_predictions_dir(tmp_path, capsys):
  # A run that has claimed its output and written nothing yet.
  run_dir = tmp_path / "half"
  run_dir.mkdir()
  (run_dir / schemas.RUN_LOCK_FILE).write_text("{}")
  page = _make_report(run_dir, tmp_path / "report", capsys)
  assert "did not finish" in page and "No predictions in this run." in page


def test_manifest_and_parquet_disagreeing_is_shown(tmp_path):
  run_dir = _write_run(tmp_path / "run")
  path = os.path.join(run_dir, schemas.MANIFEST_FILE)
  with open(path) as f:
    manifest = json.load(f)
  manifest["counts"]["predictions"] = 99
  with open(path, "w") as f:
    json.dump(manifest, f)
  data = report.query_report_data(run_dir)
  page = report.render_html(data, report.figures_for(data))
  assert "manifest says 99 predictions, the Parquet holds 36 rows" in page


def test_flag_rate_check_is_shown(tmp_path):
  """The manifest's flag-rate check: the expected share beside the run's,
  and a warning per raised check (none when nothing is raised)."""
  from busi_core import flag_rates  # pylint: disable=import-outside-toplevel
  run_dir = _write_run(tmp_path / "run")
  path = os.path.join(run_dir, schemas.MANIFEST_FILE)
  with open(path) as f:
    manifest = json.load(f)
  low, ood = schemas.COLUMN_LOW_CONFIDENCE, schemas.COLUMN_OUT_OF_DISTRIBUTION
  def page_with(counts):
    manifest[schemas.MANIFEST_FLAG_RATES] = flag_rates.check({
        low: {"share": 0.3, "images": 600,
              "from": schemas.FLAG_RATE_FROM_CROSS_VALIDATION},
        ood: {"share": 0.01, "from": schemas.FLAG_RATE_FROM_OOD_PASS_RATE},
    }, {"predictions": 36, **counts})
    with open(path, "w") as f:
      json.dump(manifest, f)
    data = report.query_report_data(run_dir)
    return report.render_html(data, report.figures_for(data))
  calm = page_with({low: 11, ood: 0})
  assert ("For comparison, the model flags 30% of its held-out"
          " cross-validation folds (600 images).") in calm
  assert 'class="warning"' not in calm
  from reporting import summary  # pylint: disable=import-outside-toplevel
  assert [r[-1] for r in _summary_table(summary.summary(run_dir),
                                        "Flag-rate check")] == ["no", "no"]
  assert "WARNING" not in summary.summary(run_dir)
  alarmed = page_with({low: 30, ood: 20})
  warnings = re.findall(r'<p class="warning" id="flag-rate-warning-\d">'
                        r"([^<]*)</p>", alarmed)
  assert len(warnings) == 2
  assert warnings[0].startswith("83% of the 36 images scored are"
                                " low-confidence; the model flags 30%")
  assert "out of distribution" in warnings[1]
  text = summary.summary(run_dir)
  rows = {r[0]: r[1:] for r in _summary_table(text, "Flag-rate check")}
  assert rows[low][:5] == ["30", "83%", "30%", "cross_validation", "2e-10"]
  assert rows[low][-1] == rows[ood][-1] == "RAISED"
  assert text.count("WARNING: ") == 2
  # A source passed over (cv warned of a fold model): the table, the
  # warning and the report's comparison name it.
  manifest[schemas.MANIFEST_FLAG_RATES][low].update({
      "from": schemas.FLAG_RATE_FROM_TEST, "images": 100,
      "passed_over": {schemas.FLAG_RATE_FROM_CROSS_VALIDATION: "warned"}})
  with open(path, "w") as f:
    json.dump(manifest, f)
  text = summary.summary(run_dir)
  rows = {r[0]: r[1:] for r in _summary_table(text, "Flag-rate check")}
  assert rows[low][3] == "test (not cross_validation)"
  assert ("the model flags 30% of its test split (not its held-out"
          " cross-validation folds: cv warned of a fold model there)") in text
  data = report.query_report_data(run_dir)
  assert ("For comparison, the model flags 30% of its test split (not its"
          " held-out cross-validation folds: cv warned of a fold model"
          " there) (100 images).") in report.render_html(
              data, report.figures_for(data))
  # A flag given on the command line: not checked, and said why.
  manifest[schemas.MANIFEST_FLAG_RATES][low] = {
      "share": None, "why": "--threshold replaces the artifact's threshold",
      "flagged": 30, "observed": 30 / 36, "p_value": None, "raised": False}
  # Text from the manifest is escaped (a hand-edited one included).
  manifest[schemas.MANIFEST_FLAG_RATES]["<b>x</b>"] = dict(
      manifest[schemas.MANIFEST_FLAG_RATES][ood])
  with open(path, "w") as f:
    json.dump(manifest, f)
  data = report.query_report_data(run_dir)
  page = report.render_html(data, report.figures_for(data))
  assert ("The low-confidence share was not checked against the model&#x27;s:"
          " --threshold replaces the artifact&#x27;s threshold.") in page
  assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
  rows = {r[0]: r[1:] for r in _summary_table(summary.summary(run_dir),
                                              "Flag-rate check")}
  assert rows[low][2:] == ["n/a: --threshold replaces the artifact's"
                           " threshold", "n/a", "n/a", "no"]
  # Runs from before the check, or with a mangled field: no table, no crash.
  for value in (None, [1, 2], "x"):
    if value is None:
      del manifest[schemas.MANIFEST_FLAG_RATES]
    else:
      manifest[schemas.MANIFEST_FLAG_RATES] = value
    with open(path, "w") as f:
      json.dump(manifest, f)
    assert "Flag-rate check" not in summary.summary(run_dir)
    data = report.query_report_data(run_dir)
    assert 'class="warning"' not in report.render_html(
        data, report.figures_for(data))


def test_the_models_training_warnings_come_first(tmp_path):
  """A run whose model train wrote with a warning (e.g. one class for
  every validation image): the report's Run section and the summary open
  with it; none for a model without, nor for a run from before the field."""
  from reporting import summary  # pylint: disable=import-outside-toplevel
  run_dir = _write_run(tmp_path / "run")
  def page():
    data = report.query_report_data(run_dir)
    return report.render_html(data, report.figures_for(data))
  # Absent (a run from before the field), null (a model from before train's
  # checks), none found, and a hand-edited string (not split into letters).
  for warnings in ("absent", None, [], "one class"):
    if warnings != "absent":
      _set_manifest(run_dir, **{schemas.MANIFEST_MODEL_WARNINGS: warnings})
    assert "model-warning" not in page()
    assert "WARNING" not in summary.summary(run_dir)
  warning = "the model predicts <malignant> for all 27 validation images"
  _set_manifest(run_dir, **{schemas.MANIFEST_MODEL_WARNINGS: [warning, 7]})
  with open(os.path.join(run_dir, schemas.MANIFEST_FILE)) as f:
    version = json.load(f)[schemas.MANIFEST_MODEL_VERSION]
  sentence = (f"The model {version} carries a warning from the training of"
              f" its weights: {warning}")
  shown = re.findall(r'<section id="run"><h2>Run</h2><p class="warning"'
                     r' id="model-warning-(\d)">([^<]*)</p><div', page())
  assert shown == [("0", html.escape(sentence))]  # escaped; not a string: skipped
  assert summary.summary(run_dir).startswith(f"WARNING: {sentence}\n\n")


def test_figures_are_pngs():
  assert report.class_bar_png(
      [report.ClassCount("benign", 3, 0.7)]).startswith(PNG_MAGIC)
  assert report.confidence_histogram_png(
      [0] * 40 + [1] * 10, [0.9]).startswith(PNG_MAGIC)
  assert report.confusion_matrix_png(
      ["a", "b"], {("a", "a"): 2, ("a", "b"): 1}).startswith(PNG_MAGIC)


def test_histogram_bins_cover_every_row(tmp_path):
  data = report.query_report_data(_write_run(tmp_path / "run"))
  assert len(data.histogram) == report.HISTOGRAM_BINS
  assert sum(data.histogram) == data.total == 36


def test_gallery_reads_gs_overlays(tmp_path, gcs_client):
  gcs.configure_for_emulator()
  png = _overlay_png(20)
  gcs_client.bucket(BUCKET).blob("run/gradcam/a.png").upload_from_string(png)
  item = report.GalleryItem("s", "benign", 0.5, True, None,
                            f"gs://{BUCKET}/run/gradcam/a.png")
  [image] = report.read_gallery([item], str(tmp_path))
  assert image.data == png and image.problem is None


def test_relative_overlay_uri_resolves_against_the_run_dir(tmp_path):
  (tmp_path / "gradcam").mkdir()
  (tmp_path / "gradcam" / "a.png").write_bytes(_overlay_png(8))
  item = report.GalleryItem("s", "benign", 0.5, True, None, "gradcam/a.png")
  [image] = report.read_gallery([item], str(tmp_path))
  assert image.data is not None


# --------------------------------------------------------------------------
# Review: needs_review, quality flags, out-of-distribution thumbnails


def _rows(run_dir: str) -> List[Dict]:
  return pq.read_table(os.path.join(run_dir, schemas.PREDICTIONS_DIR)
                      ).to_pylist()


def _rewrite_predictions(run_dir: str, change, schema: pa.Schema) -> None:
  """Rewrites the run's Parquet with each row passed through `change`."""
  rows = [change(dict(r)) for r in _rows(run_dir)]
  _write_table(os.path.join(run_dir, schemas.PREDICTIONS_DIR,
                            "part-00000-of-00001.parquet"), rows, schema)


def _set_manifest(run_dir: str, **fields) -> None:
  path = os.path.join(run_dir, schemas.MANIFEST_FILE)
  with open(path) as f:
    manifest = json.load(f)
  manifest.update(fields)
  with open(path, "w") as f:
    json.dump(manifest, f)


def _review_html(page: str) -> str:
  match = re.search(r'<section id="review">.*?</section>', page, re.S)
  assert match, "no review section"
  return match.group(0)


class _Card(NamedTuple):
  """One figure of the OOD gallery."""
  source: str  # from the caption
  alt: Optional[str]  # of its <img>, None for a gap
  png: Optional[bytes]
  gap: Optional[str]  # the gap's reason


def _ood_cards(section: str) -> List[_Card]:
  cards = []
  for fig in re.findall(r"<figure>(.*?)</figure>", section, re.S):
    source = re.search(r'<span class="source" title="([^"]*)"', fig).group(1)
    img = re.search(r'<img src="data:image/png;base64,([^"]*)" alt="([^"]*)"',
                    fig)
    gap = re.search(r'<div class="missing">(.*?)</div>', fig, re.S)
    cards.append(_Card(
        html.unescape(source), img and html.unescape(img.group(2)),
        img and base64.b64decode(img.group(1)),
        gap and html.unescape(gap.group(1))))
  return cards


def _decode_png(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    assert im.format == "PNG"
    return np.asarray(im.convert("RGB"))


def _expected_review(rows: List[Dict]) -> Dict[str, int]:
  """The review counts, from the rows in Python (not the report's SQL)."""
  return {
      "needs review": sum(r[schemas.COLUMN_NEEDS_REVIEW] for r in rows),
      "low confidence": sum(r[schemas.COLUMN_LOW_CONFIDENCE] for r in rows),
      "out of distribution": sum(
          bool(r[schemas.COLUMN_OUT_OF_DISTRIBUTION]) for r in rows),
      "any quality flag": sum(
          bool(r[schemas.COLUMN_QUALITY_FLAGS]) for r in rows),
  }


def _ood_order(rows: List[Dict]) -> List[int]:
  """Row indices of the OOD members, most out of distribution first."""
  ood = [i for i, r in enumerate(rows) if r[schemas.COLUMN_OUT_OF_DISTRIBUTION]]
  return sorted(ood, key=lambda i: -rows[i][schemas.COLUMN_OOD_SCORE])


def test_review_section_numbers(full_report):
  run_dir, _, page = full_report
  rows = _rows(run_dir)
  parsed = _parse(page)
  expected = _expected_review(rows)
  # The fixture covers every case: flagged, not, and null.
  assert 0 < expected["out of distribution"] < len(rows) - len(NULL_OOD_ROWS)
  assert 0 < expected["needs review"] < len(rows)
  review = {r[0]: r[1:] for r in parsed.tables["review"][1:]}
  assert review == {k: [str(n), f"{100 * n / len(rows):.1f}%"]
                    for k, n in expected.items()}
  share = f"{100 * expected['needs review'] / len(rows):.1f}%"
  assert f'<span id="needs-review-share">{share}</span>' in page
  flags: Dict[str, int] = {}
  for r in rows:
    for flag in (r[schemas.COLUMN_QUALITY_FLAGS] or "").split(","):
      if flag:
        flags[flag] = flags.get(flag, 0) + 1
  assert flags == {"colour": 9, "blank": 9, "low_contrast": 9}
  assert {r[0]: int(r[1]) for r in parsed.tables["quality-flags"][1:]} == flags
  assert f"ood_score above {OOD_THRESHOLD:g}" in page
  assert "Quality checks recorded for 27 of 36 images." in page
  assert "OOD scores recorded for 32 of 36 images." in page


def test_review_section_thumbnails_are_the_ood_members(full_report):
  run_dir, _, page = full_report
  rows = _rows(run_dir)
  section = _review_html(page)
  cards = _ood_cards(section)
  order = _ood_order(rows)
  assert sorted(order) == list(OOD_ROWS)
  # Every OOD member once, most out of distribution first; none else.
  assert [c.source for c in cards] == [rows[i]["source"] for i in order]
  assert section.count("<img") == len(OOD_ROWS) - 1
  for i, card in zip(order, cards):
    if i == NO_THUMBNAIL_ROW:
      # Not in the TFRecords: a gap that says why, no <img>.
      assert card.alt is None
      assert card.gap == "not in the 1 TFRecord file read"
    else:
      assert card.gap is None and card.alt == f"thumbnail of {rows[i]['source']}"
      # The stored pixels themselves, channels in RGB order.
      np.testing.assert_array_equal(_decode_png(card.png), _pixels(i))
  assert f"<p>{len(OOD_ROWS)} of {len(OOD_ROWS)} out-of-distribution" in page


def _summary_table(text: str, title: str) -> List[List[str]]:
  """The body rows of the summary table whose title starts with `title`."""
  for part in text.split("\n\n"):
    lines = part.splitlines()
    if lines[0].startswith(f"-- {title}"):
      return [re.split(r"\s{2,}", line.strip()) for line in lines[3:]
              if not line.endswith(".")]  # notes end with a full stop
  raise AssertionError(f"no table {title!r} in:\n{text}")


def test_summary_review_tables(tmp_path):
  from reporting import summary  # pylint: disable=import-outside-toplevel
  run_dir = _write_run(tmp_path / "run")
  rows = _rows(run_dir)
  text = summary.summary(run_dir)
  expected = _expected_review(rows)
  review = {r[0]: r[1:] for r in _summary_table(text, "Needs review")}
  assert review == {
      k.replace(" ", "_"): [str(n), f"{n / len(rows):.3f}".rstrip("0")]
      for k, n in expected.items()}
  assert "Quality checks recorded for 27 of 36 images." in text
  flags = _summary_table(text, "Quality flags")
  assert {f: int(n) for f, n, _ in flags} == {
      "colour": 9, "blank": 9, "low_contrast": 9}
  top = _summary_table(text, "Most out-of-distribution (top 10)")
  assert [(r[0], r[1]) for r in top] == [
      (rows[i]["source"], rows[i]["image_id"]) for i in _ood_order(rows)]
  assert [float(r[4]) for r in top] == sorted(
      (10.0 + i for i in OOD_ROWS), reverse=True)


def _drop_review_columns(run_dir: str) -> None:
  old = pa.schema([f for f in schemas.predictions_schema(schemas.LABELS)
                   if f.name not in sql.REVIEW_COLUMNS])
  _rewrite_predictions(
      run_dir, lambda r: {k: v for k, v in r.items()
                          if k not in sql.REVIEW_COLUMNS}, old)


def test_runs_before_the_review_columns_summarise_and_report(tmp_path,
                                                             capsys):
  from beam_pipeline import cli  # pylint: disable=import-outside-toplevel
  from reporting import summary  # pylint: disable=import-outside-toplevel
  run_dir = _write_run(tmp_path / "run")
  _drop_review_columns(run_dir)
  assert not set(sql.REVIEW_COLUMNS) & set(_rows(run_dir)[0])
  text = summary.summary(run_dir)
  notes = [line for line in text.splitlines() if "Needs review" in line]
  assert notes == [
      "-- Needs review: not recorded (predictions written before the"
      " ood_score, out_of_distribution, quality_flags, needs_review columns)"]
  assert "Quality flags" not in text and "out-of-distribution" not in text
  assert "Low-confidence share" in text and "Accuracy by class" in text
  assert cli.main(["summary", "--output", run_dir]) == 0
  assert "not recorded" in capsys.readouterr().out

  page = _make_report(run_dir, tmp_path / "report", capsys)
  section = _review_html(page)
  assert "Not recorded: this run&#x27;s predictions were written before" in (
      section)
  assert "<img" not in section and 'id="ood-gallery"' not in page
  parsed = _parse(page)
  assert "per-class" in parsed.tables and "review" not in parsed.tables


def test_model_without_ood_detector(tmp_path, capsys):
  from reporting import summary  # pylint: disable=import-outside-toplevel
  run_dir = _write_run(tmp_path / "run")

  def no_detector(row):
    row[schemas.COLUMN_OOD_SCORE] = None
    row[schemas.COLUMN_OUT_OF_DISTRIBUTION] = None
    row[schemas.COLUMN_NEEDS_REVIEW] = bool(
        row[schemas.COLUMN_LOW_CONFIDENCE] or
        row[schemas.COLUMN_QUALITY_FLAGS])
    return row

  _rewrite_predictions(run_dir, no_detector,
                       schemas.predictions_schema(schemas.LABELS))
  _set_manifest(run_dir, ood_threshold=None)
  text = summary.summary(run_dir)
  assert ("The model had no OOD detector: ood_score is null in every row"
          in text)
  review = {r[0]: r[1:] for r in _summary_table(text, "Needs review")}
  assert review["out_of_distribution"] == ["n/a", "n/a"]
  assert ("-- Most out-of-distribution: none recorded (the model had no OOD"
          " detector)") in text.splitlines()
  page = _make_report(run_dir, tmp_path / "report", capsys)
  section = _review_html(page)
  assert "The model had no OOD detector" in section
  review = {r[0]: r[1:] for r in _parse(page).tables["review"][1:]}
  assert review["out of distribution"] == ["n/a", "n/a"]
  assert 'id="ood-gallery"' not in section and "<img" not in section


def test_score_run_reads_thumbnails_from_the_manifest_inputs(tmp_path,
                                                             capsys):
  run_dir = _write_run(tmp_path / "run", tfrecords=False)
  rows = _rows(run_dir)
  # Two shards, every image in them (the one the run's own shard lacks too).
  shards = tmp_path / "shards"
  for k in range(2):
    _write_tfrecords(str(shards / f"part-{k}-of-2.tfrecord.gz"), rows,
                     range(k, len(rows), 2))
  _set_manifest(run_dir, command="score",
                inputs=[str(shards / "*.tfrecord.gz")])
  page = _make_report(run_dir, tmp_path / "report", capsys)
  cards = _ood_cards(_review_html(page))
  assert len(cards) == len(OOD_ROWS)
  for i, card in zip(_ood_order(rows), cards):
    assert card.gap is None
    np.testing.assert_array_equal(_decode_png(card.png), _pixels(i))

  # --ood_thumbnails: only the most out of distribution.
  assert report.main(["--predictions", run_dir, "--output",
                      str(tmp_path / "two"), "--ood_thumbnails", "2"]) == 0
  with open(tmp_path / "two" / report.REPORT_FILE, encoding="utf-8") as f:
    cards = _ood_cards(_review_html(f.read()))
  assert [c.source for c in cards] == [
      rows[i]["source"] for i in _ood_order(rows)[:2]]


def test_thumbnails_missing_everywhere_are_gaps(tmp_path):
  run_dir = _write_run(tmp_path / "run", tfrecords=False)
  _set_manifest(run_dir, command="score",
                inputs=[str(tmp_path / "gone" / "*.tfrecord.gz")])
  page = report.build_report(run_dir)
  cards = _ood_cards(_review_html(page))
  assert len(cards) == len(OOD_ROWS)
  for card in cards:
    assert card.png is None
    assert card.gap.startswith("no TFRecords found (looked in ")
    assert str(tmp_path / "gone") in card.gap
  # A `run` manifest's inputs are archives: never scanned as TFRecords.
  _set_manifest(run_dir, command="run")
  files = thumbnails.tfrecord_files(run_dir, run_files.load_manifest(run_dir))
  assert files.uris == () and len(files.looked_in) == 1


def test_thumbnail_scan_stops_once_every_image_is_found(tmp_path,
                                                        monkeypatch):
  records = [training_testing.make_record(_pixels(i), "") for i in range(4)]
  first = training_testing.write_tfrecords(str(tmp_path / "a.tfrecord.gz"),
                                           records[:2])
  second = training_testing.write_tfrecords(str(tmp_path / "b.tfrecord.gz"),
                                            records[2:])
  read = []  # (uri, index) of every record the scan took
  read_file = thumbnails.tfrecord_io.read_file

  def spy(uri, *args):
    for item in read_file(uri, *args):
      read.append((uri, item.index))
      yield item

  monkeypatch.setattr(thumbnails.tfrecord_io, "read_file", spy)
  files = thumbnails.TFRecordFiles((first, second), ("*",))
  found = thumbnails.read_thumbnails([records[0].image_id], files)
  assert read == [(first, 0)]
  np.testing.assert_array_equal(
      _decode_png(found[records[0].image_id].png), records[0].pixels)
  read.clear()
  found = thumbnails.read_thumbnails(
      [records[2].image_id, "f" * 64], files)
  assert read == [(first, 0), (first, 1), (second, 0), (second, 1)]
  assert found[records[2].image_id].problem is None
  assert found["f" * 64] == thumbnails.Thumbnail(
      None, "not in the 2 TFRecord files read")


def test_damaged_tfrecords_are_named_in_the_gap(tmp_path):
  bad = tmp_path / "bad.tfrecord.gz"
  bad.write_bytes(b"\x1f\x8b not really gzip")
  files = thumbnails.TFRecordFiles((str(bad),), ("*",))
  [(_, thumb)] = thumbnails.read_thumbnails(["a" * 64], files).items()
  assert thumb.png is None
  assert thumb.problem == ("not in the 1 TFRecord file read (1 damaged"
                           " records or regions skipped)")


def test_thumbnails_are_shrunk_to_the_longest_side():
  pixels = np.zeros((400, 300, 3), np.uint8)
  pixels[..., 0] = 255  # red, so a channel swap shows
  small = _decode_png(thumbnails.thumbnail_png(pixels))
  side = thumbnails.MAX_THUMBNAIL_SIDE
  assert small.shape == (side, side * 3 // 4, 3)
  assert (small[..., 0] == 255).all() and (small[..., 1:] == 0).all()


def test_thumbnails_read_gs_tfrecords(tmp_path, gcs_client):
  del gcs_client  # the emulator, through Beam's FileSystems
  gcs.configure_for_emulator()
  record = training_testing.make_record(_pixels(3), "")
  training_testing.write_tfrecords(
      f"gs://{BUCKET}/scored/part-0.tfrecord.gz", [record])
  files = thumbnails.tfrecord_files(str(tmp_path), {
      "command": "score", "inputs": [f"gs://{BUCKET}/scored/*.tfrecord.gz"]})
  assert files.uris == (f"gs://{BUCKET}/scored/part-0.tfrecord.gz",)
  found = thumbnails.read_thumbnails([record.image_id], files)
  np.testing.assert_array_equal(_decode_png(found[record.image_id].png),
                                record.pixels)


def _browser() -> str:
  for name in BROWSER_NAMES:
    path = shutil.which(name)
    if path:
      return path
  pytest.fail("no headless browser found (looked for "
              f"{', '.join(BROWSER_NAMES)}): run `apt-get install -y "
              "chromium`, or set BUSI_SKIP_BROWSER=1 to skip this check")


@pytest.mark.slow
def test_headless_chromium_draws_the_page(full_report, tmp_path):
  if os.environ.get("BUSI_SKIP_BROWSER") == "1":
    pytest.skip("BUSI_SKIP_BROWSER=1: no browser check")
  browser = _browser()
  _, out_dir, _ = full_report
  shot = tmp_path / "report.png"
  profile = tmp_path / "profile"
  url = "file://" + os.path.abspath(os.path.join(out_dir, report.REPORT_FILE))
  proc = subprocess.run(
      [browser, "--headless", "--no-sandbox", "--disable-gpu",
       "--hide-scrollbars", f"--user-data-dir={profile}",
       "--window-size=1280,2400", f"--screenshot={shot}", url],
      capture_output=True, text=True, timeout=120, check=False)
  assert shot.exists(), (proc.returncode, proc.stderr[-2000:])
  with Image.open(shot) as im:
    assert im.size == (1280, 2400)
    pixels = np.asarray(im.convert("RGB"))
  # Not blank: a blank or error page is one or two flat colours.
  assert pixels.std() > 20
  colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
  assert len(colours) > 200
  # The page header (dark band) is where the CSS puts it: drawn, styled.
  assert pixels[:40, :, :].mean() < 100


def test_summary_and_report_read_the_same_sql(tmp_path, capsys):
  from beam_pipeline import cli  # pylint: disable=import-outside-toplevel
  from reporting import summary  # pylint: disable=import-outside-toplevel
  run_dir = _write_run(tmp_path / "run")
  data = report.query_report_data(run_dir)
  text = summary.summary(run_dir)
  lines = text.splitlines()
  for title in ("Predictions per class", "Low-confidence share",
                "Accuracy against known labels", "Accuracy by class",
                "Errors by stage and type"):
    assert any(title in line for line in lines), title
  # The per-class counts and the flagged count agree with the report's.
  for count in data.per_class:
    assert any(line.split()[:2] == [count.predicted_class,
                                    str(count.images)] for line in lines)
  share = lines[lines.index("-- Low-confidence share") + 3].split()
  assert share[:2] == [str(data.total), str(data.flagged)]
  errors = lines[lines.index("-- Errors by stage and type") + 3].split()
  assert errors[:3] == ["decode", "CorruptImage", "2"]
  assert cli.main(["summary", "--output", run_dir]) == 0
  assert "Predictions per class" in capsys.readouterr().out
  # A run without an errors table is still summarised.
  assert "Errors by stage" not in summary.summary(
      _write_run(tmp_path / "clean", with_errors=False))


def test_a_text_table_shows_no_value_as_n_a():
  """A share of nothing (an empty run) reads as the tables that say why
  do, not as Python's None."""
  from reporting import summary  # pylint: disable=import-outside-toplevel
  table = summary.text_table("Shares", ("reason", "images", "share"),
                             [("needs_review", 0, None), ("x", 3, 0.25)])
  assert table.splitlines()[3:] == ["needs_review  0       n/a  ",
                                    "x             3       0.25 "]
