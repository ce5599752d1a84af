"""The hint every command line gives for a misspelt flag or command."""

import difflib
from typing import Iterable


def did_you_mean(word: str, choices: Iterable[str]) -> str:
  """' (did you mean X?)' naming the closest of `choices` to `word`, or ''
  when none is close (difflib's default cutoff, 0.6)."""
  close = difflib.get_close_matches(word, list(choices), n=1)
  return f" (did you mean {close[0]}?)" if close else ""
