"""Storage failures a person can act on, found in whatever Beam raised.

A full disk, a read-only file system or a missing permission reaches the
launcher wrapped: Beam re-raises a worker's OSError as a RuntimeError whose
message is the original's text plus the step name, chains it, or (other
runners, other processes) passes only the text on. `io_cause` looks through
the chain, Beam's BeamIOError details and the text for the errno, so that the
command line can say what happened and what to do in one line.
"""

import errno
import re
from typing import Iterator, NamedTuple, Optional, Tuple


class IoCause(NamedTuple):
  """What stopped the writes, and what to do about it."""
  reason: str  # the system's words, e.g. "No space left on device"
  advice: str  # what to do, e.g. "free space or choose another --output"
  filename: Optional[str] = None  # the file concerned, when known


_PERMISSION = "check the folder's permissions or choose another --output"
# errno → (the system's message, what to do). The messages are matched in
# text too: they are what strerror() says on Linux.
_CAUSES = {
    errno.ENOSPC: ("No space left on device",
                   "free space or choose another --output"),
    errno.EDQUOT: ("Disk quota exceeded",
                   "free space within your quota or choose another --output"),
    errno.EROFS: ("Read-only file system", "choose a writable --output"),
    errno.EACCES: ("Permission denied", _PERMISSION),
    errno.EPERM: ("Operation not permitted", _PERMISSION),
}
# Cloud Storage refuses a write with HTTP 403 (google.api_core's Forbidden),
# and runs out of quota with 429; neither carries an errno.
_HTTP_FORBIDDEN = 403
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")


class OutputNotWritable(OSError):
  """The output location refused a probe write before the run started."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
  """`exc`, its causes and contexts, and the errors Beam keeps in details."""
  seen = set()
  stack = [exc]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    stack.extend((e.__cause__, e.__context__))
    details = getattr(e, "exception_details", None)  # BeamIOError
    if isinstance(details, dict):
      stack.extend(v for v in details.values()
                   if isinstance(v, BaseException))
    stack.extend(a for a in getattr(e, "args", ())
                 if isinstance(a, BaseException))


def interrupted(exc: BaseException) -> bool:
  """Whether `exc` is a Ctrl-C that Beam caught in a step and re-raised.

  Beam re-raises what a step raised with the step's name added, and a
  KeyboardInterrupt, which takes no message, comes out as a RuntimeError
  reading "KeyboardInterrupt [while running '...']".
  """
  return any(isinstance(e, KeyboardInterrupt) or
             str(e).startswith(KeyboardInterrupt.__name__)
             for e in _chain(exc))


def _cause(code: int, filename=None) -> IoCause:
  reason, advice = _CAUSES[code]
  return IoCause(reason, advice, str(filename) if filename else None)


def io_cause(exc: BaseException) -> Optional[IoCause]:
  """The storage failure behind `exc`, or None if it is not one.

  Args:
    exc: what a pipeline run or a write raised.

  Returns:
    The first ENOSPC, EDQUOT, EROFS, EACCES or EPERM found as an errno in the
    exception chain, else as `[Errno N]` or the system's message in the text
    of any exception in it (Beam passes workers' errors on as text); a
    Cloud Storage 403 counts as permission denied.
  """
  chain = list(_chain(exc))
  for e in chain:
    code = getattr(e, "errno", None)
    if code in _CAUSES:
      return _cause(code, getattr(e, "filename", None))
  for e in chain:
    if getattr(e, "code", None) == _HTTP_FORBIDDEN:
      return _cause(errno.EACCES)
  for e in chain:
    text = str(e)
    for found in _ERRNO_TEXT.findall(text):
      if int(found) in _CAUSES:
        return _cause(int(found))
    for code, (reason, _) in _CAUSES.items():
      if reason in text:
        return _cause(code)
  return None


HTTP_NOT_FOUND = 404
# The bucket in a Cloud Storage JSON API URL (…/b/BUCKET/o…).
_GCS_BUCKET = re.compile(r"/b/([a-z0-9][a-z0-9._-]*)")


def gcs_refusal(exc: BaseException) -> Optional[Tuple[int, str]]:
  """The HTTP status and a one-line account of a Cloud Storage 404 or 403
  behind `exc` (a missing bucket, a forbidden one), or None: only Google API
  errors of a request to a bucket count."""
  from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
  for code, what, advice in (
      (HTTP_NOT_FOUND, "not found (404)",
       "check the bucket's name and that it exists"),
      (_HTTP_FORBIDDEN, "access denied (403)",
       "grant this account access to the bucket or choose another")):
    for e in _chain(exc):
      bucket = _GCS_BUCKET.search(str(e))
      if (isinstance(e, exceptions.GoogleAPICallError) and e.code == code
          and bucket):
        where = f"bucket {bucket.group(1)}"
        if code == HTTP_NOT_FOUND and "No such object" in str(e):
          where, advice = f"an object in {where}", "check the path"
        return code, f"Cloud Storage: {where}: {what}; {advice}"
  return None
