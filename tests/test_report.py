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
from typing import Dict, List

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import schemas
from busi_core import gcs
from reporting import report
from reporting.sql import predictions_glob
from tests.conftest import BUCKET

RUN_ID = "20260101T000000Z-abcdef01"
MODEL_VERSION = "busi-vgg16-test"
THRESHOLD = 0.9
EVIL_SOURCE = "evil.zip!/<script>alert('x')</script>.png"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _overlay_png(size: int = 48) -> bytes:
  y, x = np.mgrid[0:size, 0:size]
  rgb = np.stack([x * 255 // size, y * 255 // size,
                  np.full_like(x, 128)], axis=-1).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="PNG")
  return buf.getvalue()


def _prediction_rows(n: int, overlay_uri: str, missing_uri: str) -> List[Dict]:
  rng = np.random.default_rng(0)
  labels = schemas.LABELS
  rows = []
  scored_at = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
  for i in range(n):
    probs = rng.dirichlet([1.0, 1.0, 1.0] if i % 3 else [8.0, 0.5, 0.5])
    probs = np.roll(probs, i % 3)
    top = int(np.argmax(probs))
    row = {
        "image_id": f"id{i:03d}",
        "source": f"data.zip!/Dataset_BUSI_with_GT/{labels[i % 3]}/{i}.png",
        # Two thirds labelled, from the folder; the rest unknown.
        "label": labels[i % 3] if i % 3 != 2 or i < 12 else None,
        "predicted_class": labels[top],
        "confidence": float(probs[top]),
        "low_confidence": bool(probs[top] < THRESHOLD),
        "threshold": THRESHOLD,
        "model_version": MODEL_VERSION,
        "run_id": RUN_ID,
        "scored_at": scored_at,
        "gradcam_uri": None,
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


def _write_run(run_dir, n: int = 36, with_errors: bool = True) -> str:
  """A scored run's outputs in `run_dir`, as the pipeline lays them out."""
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
  n_errors = len(errors) if with_errors else 0
  flagged = sum(r["low_confidence"] for r in rows)
  manifest = {
      "run_id": RUN_ID, "command": "run", "inputs": ["data.zip"],
      "model_version": MODEL_VERSION, "threshold": THRESHOLD,
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
  assert parsed.sections == ["run", "classes", "confidence", "errors",
                             "labels", "gallery"]
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
  # Bar chart, histogram, confusion matrix, one overlay; the missing overlay
  # is a text placeholder, not a broken <img>.
  assert len(parsed.images) == 4
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
  assert parsed.sections == ["run", "classes", "confidence", "errors",
                             "labels"]
  assert "No predictions in this run." in page
  assert "No errors table" in page
  assert "No labelled images" in page
  assert parsed.images == []


def test_run_without_manifest_or_predictions_dir(tmp_path, capsys):
  run_dir = tmp_path / "half"
  run_dir.mkdir()
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
