"""The one exception for an input member that cannot become an image."""

import re

# A Python object's default repr, e.g. Pillow's "cannot identify image file
# <_io.BytesIO object at 0x7f16393ca390>": its address differs on every run.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


class MemberError(ValueError):
  """An archive member or input file that cannot become an image.

  Raised by the archive readers and the decoder alike; `kind` is the
  `error_type` its error row carries (`BadMember`, `CorruptImage`, ...).
  The message is its error row's text: an object's repr quoted from a
  library's exception is dropped, so the same bytes give the same row on
  every run.
  """

  def __init__(self, kind: str, message: str):
    super().__init__(_OBJECT_REPR.sub("", message))
    self.kind = kind

  def __reduce__(self):  # picklable, so Members can cross a shuffle
    return (type(self), (self.kind, str(self)))
