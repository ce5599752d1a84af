"""What a person sees of a running job: Beam counters and a progress line.

`count` adds to a Beam counter (namespace `schemas.COUNTER_NAMESPACE`; the
Dataflow UI shows them live, a local run prints them at the end) and to the
process-wide `TALLY`, which the progress line of a local run reads.

Why a tally besides the counters: the in-process FnApiRunner's `run()` only
returns when the job is done, and it commits a counter when a bundle ends (a
local job is mostly one bundle per stage), so there is nothing to poll while
it runs. Its workers are threads of the launching process, though, so a
shared tally sees every image as it is scored. Workers in other processes
(`--direct_running_mode multi_processing`, Dataflow) keep their own tally,
which nobody reads: the launcher shows no progress line for them.
"""

import collections
import datetime
import functools
import threading
import time
from typing import Dict, NamedTuple, Optional, TextIO

from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

import schemas

# Tally-only: members the run will read (zip directories, tar listings,
# TFRecord records), known before they are decoded or scored. Not a counter:
# a retried bundle would add them twice.
EXPECTED = "expected_members"

# A member's outcomes (the manifest's invariant, less "images_written"):
# each member read ends as one of these.
_MEMBER_ERRORS = tuple(schemas.errors_counter(stage) for stage in
                       schemas.Stage if stage != schemas.Stage.GRADCAM)

# Seconds between progress lines: on a terminal, and in a log file.
EVERY_ON_TTY_S = 5.0
EVERY_IN_LOG_S = 60.0


class Tally:
  """Thread-safe counts of this process, with when each first moved."""

  def __init__(self, clock=time.monotonic):
    self._clock = clock
    self._lock = threading.Lock()
    self._counts = collections.Counter()
    self._first = {}

  def add(self, name: str, n: int = 1) -> None:
    with self._lock:
      self._counts[name] += n
      self._first.setdefault(name, self._clock())

  def reset(self) -> None:
    with self._lock:
      self._counts.clear()
      self._first.clear()

  def snapshot(self) -> Dict[str, int]:
    with self._lock:
      return dict(self._counts)

  def first(self, *names: str) -> Optional[float]:
    """When the first of `names` first moved (clock time), or None."""
    with self._lock:
      times = [self._first[n] for n in names if n in self._first]
    return min(times) if times else None


TALLY = Tally()


@functools.lru_cache(maxsize=None)
def _counter(name: str):
  return Metrics.counter(schemas.COUNTER_NAMESPACE, name)


def count(name: str, n: int = 1) -> None:
  """Adds `n` to the Beam counter `name` and to the tally.

  Outside a running step (a unit test calling a DoFn's function) the Beam
  counter is a no-op.
  """
  _counter(name).inc(n)
  TALLY.add(name, n)


def expect(n: int = 1) -> None:
  """The run will read `n` more members (for the progress line's ETA)."""
  TALLY.add(EXPECTED, n)


class Status(NamedTuple):
  """Where a run stands, as the progress line shows it."""
  images: int  # scored (or, preprocessing, decoded) so far
  errors: int  # error rows of members so far
  rate: float  # images per second since the first member's outcome
  eta_s: Optional[float]  # None: the remaining work is not known


def status(counts: Dict[str, int], images_counter: str,
           elapsed_s: Optional[float]) -> Status:
  """The progress of a run from its tally.

  Args:
    counts: `Tally.snapshot()`.
    images_counter: the counter of the command's images (predictions, or
      images decoded for preprocess).
    elapsed_s: seconds since the first image (prediction, or decoded image
      for preprocess); None before it.

  Returns:
    The status; the rate is images per second since the first image, and
    the ETA is the members expected but without an outcome yet (a
    prediction or decoded image, a mask, an error row) at that rate. Masks
    and error rows come early and fast (a `run` skips masks while the model
    is still loading), so timing from them made the ETA grow until the
    first prediction; until then it is n/a.
  """
  images = counts.get(images_counter, 0)
  errors = sum(counts.get(name, 0) for name in _MEMBER_ERRORS)
  outcomes = (images + errors + counts.get(schemas.COUNTER_MASKS_SKIPPED, 0)
              + counts.get(schemas.COUNTER_ALREADY_SCORED, 0))
  expected = counts.get(EXPECTED, 0)
  if not images or not elapsed_s or elapsed_s <= 0:
    return Status(images, errors, 0.0, None)
  rate = images / elapsed_s
  eta_s = (expected - outcomes) / rate if expected >= outcomes else None
  return Status(images, errors, rate, eta_s)


def format_line(verb: str, state: Status) -> str:
  """E.g. `scored 812 images (23.4 img/s), 3 errors, ETA 0:01:20`."""
  eta = ("ETA n/a" if state.eta_s is None else
         f"ETA {datetime.timedelta(seconds=round(state.eta_s))}")
  return (f"{verb} {state.images} images ({state.rate:.1f} img/s),"
          f" {state.errors} errors, {eta}")


class Reporter:
  """While a local job runs (a `with` block), a thread prints its progress
  line every `every_s` seconds; a job done sooner prints none."""

  def __init__(self, stream: TextIO, verb: str, images_counter: str,
               every_s: float, tally: Tally = TALLY, clock=time.monotonic):
    self._stream = stream
    self._verb = verb
    self._images = images_counter
    self._every_s = every_s
    self._tally = tally
    self._clock = clock
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="busi-progress",
                                    daemon=True)

  def __enter__(self) -> "Reporter":
    self._tally.reset()
    self._thread.start()
    return self

  def __exit__(self, *unused_exc) -> None:
    self._stop.set()
    self._thread.join()

  def line(self) -> str:
    """The progress line now."""
    first = self._tally.first(self._images)
    elapsed = None if first is None else self._clock() - first
    return format_line(self._verb, status(self._tally.snapshot(),
                                          self._images, elapsed))

  def _loop(self) -> None:
    while not self._stop.wait(self._every_s):
      self._stream.write(self.line() + "\n")
      self._stream.flush()


def every_s(stream: TextIO) -> float:
  """Seconds between progress lines: often on a terminal, rarely in a log."""
  isatty = getattr(stream, "isatty", None)
  return EVERY_ON_TTY_S if isatty is not None and isatty() else (
      EVERY_IN_LOG_S)


def committed_counters(result) -> Dict[str, int]:
  """The Beam counters a finished job committed, summed over its steps, in
  reading order (`schemas.counter_rank`)."""
  found = result.metrics().query(
      MetricsFilter().with_namespace(schemas.COUNTER_NAMESPACE))["counters"]
  totals = collections.Counter()
  for item in found:
    totals[item.key.metric.name] += item.committed or 0
  return {name: totals[name]
          for name in sorted(totals, key=schemas.counter_rank)}
