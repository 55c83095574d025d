"""What the command-line programs share: one-line errors, and absl flag parsing that
reports a bad flag or config value that way (exit status 2, no traceback)."""

import sys

from absl import flags


def fail(message: str):
  """A config or input problem: one message, no traceback, exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl flag parsing whose config errors are one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as error:
    fail(" ".join(str(error).split()) or repr(error))
