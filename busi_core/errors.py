"""The one exception for an input member that cannot become an image."""


class MemberError(ValueError):
  """An archive member or input file that cannot become an image.

  Raised by the archive readers and the decoder alike; `kind` is the
  `error_type` its error row carries (`BadMember`, `CorruptImage`, ...).
  """

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind

  def __reduce__(self):  # picklable, so Members can cross a shuffle
    return (type(self), (self.kind, str(self)))
