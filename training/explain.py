"""`python -m training gradcam`: one image file → probabilities + overlay PNG.

The file is decoded and resized by `busi_core.imaging.decode_and_resize`
at the artifact's image_size, i.e. exactly as the pipeline preprocesses it,
and the heatmap comes from `busi_core.gradcam` as in scoring's `--gradcam`.
"""

import os
from typing import List, NamedTuple, Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems

from busi_core import dicom, imaging
from busi_core import artifact, gradcam
from busi_core.errors import MemberError


class Explanation(NamedTuple):
  image: str
  output: str
  model_version: str
  labels: List[str]
  probabilities: List[float]  # calibrated, in labels order
  predicted: str
  explained: str  # the class the heatmap is for
  threshold: float
  flagged: bool  # confidence < threshold, as scoring flags it
  # A multi-frame DICOM: how many frames it has (the first is explained,
  # as `preprocess --max_frames_per_file 1` would keep it); else None.
  frames: Optional[int] = None


def _pixels(image: str, data: bytes, size: int):
  """The file's pixels as preprocessing makes them, [1, size, size, 3]: a
  DICOM's first frame (cropped to its ultrasound region, as `preprocess`
  does), else the decoded image; and the DICOM's frame count (None for
  other files).

  Raises:
    ValueError: the bytes do not decode (MemberError); an archive; a DICOM
      that cannot be read, named by its exception's type only (its text may
      quote the header).
  """
  if dicom.is_dicom(data):
    try:
      header = dicom.read_header(data, imaging.DEFAULT_MAX_PIXELS)
      frame = next(dicom.iter_frames(data, header, 1))
    except MemberError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"--image {image}: unreadable DICOM"
                       f" ({type(e).__name__})") from None
    return (imaging.resize_pixels(frame.pixels, size).pixels[None],
            header.frames)
  try:
    return imaging.decode_and_resize(data, size).pixels[None], None
  except MemberError as e:
    if e.kind != "NestedArchive":
      raise
    archive = imaging.sniff_archive(data)
    if archive not in imaging.PREPROCESS_ARCHIVES:
      raise ValueError(
          f"--image {image} is {archive}-compressed, not an image: gradcam"
          " explains one image file; decompress it") from e
    raise ValueError(
        f"--image {image} is a {archive} archive, not an"
        " image: gradcam explains one image file. Extract one, or score the"
        " archive with `python -m beam_pipeline run --gradcam all`") from e


def _same_or_inside(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies inside it (local paths resolved,
  URIs compared as text)."""
  if "://" in path or "://" in folder:
    folder = folder.rstrip("/")
    return path.rstrip("/") == folder or path.startswith(folder + "/")
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def _check_output(model_dir: str, image: str, output: str,
                  overwrite: bool) -> None:
  """The overlay never replaces the scan, a file of the artifact, or any
  file unless --overwrite says so; and it is named as what it is, a PNG."""
  if not output.lower().endswith(".png"):
    raise ValueError(f"--output {output}: the overlay is a PNG; name the"
                     " file to write *.png")
  if _same_or_inside(output, image):
    raise ValueError(f"--output {output} is the --image itself: the overlay"
                     " would replace the scan; choose another file")
  if _same_or_inside(output, model_dir):
    raise ValueError(f"--output {output} lies inside the model artifact"
                     f" {model_dir}; write the overlay outside it")
  if not overwrite and FileSystems.exists(output):
    raise ValueError(f"--output {output} already exists; choose a new file,"
                     " or pass --overwrite to replace it")


def explain_file(model_dir: str, image: str, output: str,
                 class_name: Optional[str] = None,
                 overwrite: bool = False) -> Explanation:
  """Writes the Grad-CAM overlay of `image` and returns the prediction.

  Args:
    model_dir: artifact directory (local or gs://).
    image: the image file (local or gs://).
    output: the PNG to write (local or gs://), at the model's image_size.
    class_name: the class to explain; None for the predicted one.
    overwrite: replace an existing `output` (never the image itself nor a
      file inside the artifact).

  Raises:
    artifact.ArtifactError: the artifact is invalid.
    ValueError: unknown class, missing file, bytes that do not decode
      (MemberError), or an `output` that would replace a file it must not.
  """
  for flag, path in (("--image", image), ("--output", output)):
    if "://" not in path and os.path.isdir(path):
      raise ValueError(f"{flag} {path} is a directory; pass "
                       + ("the image file to explain" if flag == "--image"
                          else "the PNG file to write"))
  _check_output(model_dir, image, output, overwrite)
  loaded = artifact.load_artifact(model_dir)
  labels = loaded.labels
  if class_name is not None and class_name not in labels:
    raise ValueError(f"--class {class_name!r} is not one of {labels}")
  if not FileSystems.exists(image):
    raise ValueError(f"--image {image!r}: no such file")
  with FileSystems.open(image) as f:
    data = f.read()
  size = loaded.metadata.image_size
  pixels, frames = _pixels(image, data, size)
  probabilities = np.asarray(loaded.model(pixels, training=False))[0]
  predicted = labels[int(probabilities.argmax())]
  explained = class_name or predicted
  heat = gradcam.heatmaps(loaded.model, pixels, [labels.index(explained)])[0]
  with FileSystems.create(output) as f:
    f.write(gradcam.overlay_png(pixels[0], heat))
  threshold = float(loaded.metadata.threshold)
  return Explanation(
      image=image, output=output,
      model_version=loaded.metadata.model_version, labels=labels,
      probabilities=[float(p) for p in probabilities], predicted=predicted,
      explained=explained, threshold=threshold,
      flagged=bool(probabilities.max() < threshold),
      frames=frames if frames and frames > 1 else None)


def format_result(result: Explanation) -> str:
  """What the command prints."""
  lines = [f"model {result.model_version}", f"image {result.image}",
           f"predicted class: {result.predicted}", "probabilities:"]
  if result.frames:
    lines.insert(2, f"frame 1 of {result.frames} (a multi-frame DICOM: the"
                 " first frame is explained)")
  width = max(len(label) for label in result.labels)
  for label, p in zip(result.labels, result.probabilities):
    lines.append(f"  {label:<{width}}  {p:.4f}")
  confidence = max(result.probabilities)
  if result.flagged:
    lines.append(f"confidence {confidence:.4f} < threshold"
                 f" {result.threshold:.4f}: flagged for review")
  else:
    lines.append(f"confidence {confidence:.4f} >= threshold"
                 f" {result.threshold:.4f}: not flagged")
  lines.append(f"Grad-CAM for class {result.explained} written to"
               f" {result.output}")
  return "\n".join(lines)
