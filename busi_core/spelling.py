"""The hint every command line gives for a misspelt flag or command."""

import argparse
import difflib
import sys
from typing import Iterable, Optional, Sequence


def did_you_mean(word: str, choices: Iterable[str]) -> str:
  """' (did you mean X?)' naming the closest of `choices` to `word`, or ''
  when none is close (difflib's default cutoff, 0.6)."""
  close = difflib.get_close_matches(word, list(choices), n=1)
  return f" (did you mean {close[0]}?)" if close else ""


def refuse_unknown_flags(parser: argparse.ArgumentParser,
                         argv: Sequence[str]) -> None:
  """Ends the command (parser.error: usage, one line, status 2) at the
  first `--flag` in `argv` that `parser` does not take, naming the closest
  it does. argparse would report a missing required flag instead
  (`--ouptut` for `--output`), or "unrecognized arguments" without a hint.
  Flags after `--` are values, not flags."""
  known = [s for action in parser._actions for s in action.option_strings]  # pylint: disable=protected-access
  for arg in argv:
    if arg == "--":
      return
    name = arg.split("=", 1)[0]
    if name.startswith("--") and name not in known:
      parser.error(f"unknown flag {name}" + did_you_mean(name, known))


def parse_args(parser: argparse.ArgumentParser,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """`parser.parse_args(argv)` after `refuse_unknown_flags` (argv None:
  the process's own arguments, as argparse reads them)."""
  refuse_unknown_flags(parser, sys.argv[1:] if argv is None else argv)
  return parser.parse_args(argv)
