"""One run per workdir: an advisory lock file per process, held for the run's life.

`<workdir>/.lock.process-<i>` is locked with flock(2) by process i of the job and holds
who locked it (pid, host, start time, command). The kernel drops a flock when its
process dies, however it dies, so a lock file left by a killed run is simply taken
over (and reported); a live holder makes a second run stop at once, naming it.
"""

import datetime
import fcntl
import json
import os
import socket
import sys


class WorkdirBusy(Exception):
  """Another live process holds the workdir; the message names it."""


class WorkdirLock:

  def __init__(self, workdir: str, process_index: int = 0):
    self.workdir = workdir
    self.path = os.path.join(workdir, f".lock.process-{process_index}")
    self._file = None

  def acquire(self) -> dict | None:
    """Takes the lock; returns the record of a dead holder it took over (None if the lock
    was free). WorkdirBusy if a live process holds it."""
    handle = open(self.path, "a+")
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(handle)
      handle.close()
      who = (f"process {holder.get('pid')} on {holder.get('host')} (started "
             f"{holder.get('started')}: {holder.get('command')})" if holder else "another process")
      raise WorkdirBusy(f"{self.workdir} is in use by {who}; wait for that run to finish or "
                        "stop it, or train in another --workdir") from None
    previous = _read(handle)
    handle.seek(0)
    handle.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(),
               "started": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": " ".join(sys.argv)[:500]}, handle)
    handle.flush()
    self._file = handle
    return previous

  def release(self) -> None:
    if self._file is None:
      return
    self._file.seek(0)
    self._file.truncate()
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()
    self._file = None


def _read(handle) -> dict | None:
  handle.seek(0)
  try:
    return json.loads(handle.read() or "null")
  except ValueError:
    return None
