"""Flex Template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE in flex/Dockerfile).

The launcher starts `python main.py --input=... --output=... --runner=...`
with the template's parameters; this runs them as `python -m beam_pipeline
run` (see beam_pipeline.flex_template.launcher_argv).
"""

import sys

from beam_pipeline import cli, flex_template

if __name__ == "__main__":
  try:
    ARGV = flex_template.launcher_argv(sys.argv[1:])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(cli.EXIT_USAGE)
  cli.command_line(ARGV)
