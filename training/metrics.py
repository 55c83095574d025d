"""The metrics file, `<workdir>/metrics.jsonl`: one JSON object per logged step.

A run killed while writing can leave a cut last line; `open_for_append` drops it before
the resumed run appends (that step is logged again after the resume), and `read` skips
any line that does not parse, so every reader sees whole records only.
"""

import json
import os


def open_for_append(path: str):
  """`path` opened for appending, after removing a cut last line if there is one."""
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb+") as f:
      data = f.read()
      if not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)
  return open(path, "a")


def read(path: str) -> list[dict]:
  """The records of a metrics file, skipping lines that are not whole JSON objects."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records
