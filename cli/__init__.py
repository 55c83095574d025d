"""What every entry point (train.py, serve.py, tools/) shares: its common flags, its start,
its one-line errors. Libraries never import this package.

  def define_flags():                      # the program's own flags, then the common ones
    flags.DEFINE_string("checkpoint", ...)
    cli.define_flags()

  def main(argv):
    named = cli.start()                    # before any other JAX call
    ...
    cli.summary(["trained 150 steps ...", "next: python serve.py ..."])

  if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
"""

import glob
import logging
import os
import sys

from absl import flags

from core import devices

FLAGS = flags.FLAGS

# Libraries whose INFO logs a user does not need (--verbose brings them back).
_QUIET_LOGGERS = ("absl", "jax", "orbax", "grain", "etils", "tensorstore", "jax._src")


def _not_from_orbax(record: logging.LogRecord) -> bool:
  """Drops orbax's own log lines (it logs through absl): every failed asynchronous save or
  restore is logged, with tracebacks, from each of its threads, and the program then says
  in one message which step failed and what to do (model/checkpoint.py, train.py)."""
  return f"{os.sep}orbax{os.sep}" not in record.pathname


def _drop_closed_loop_tracebacks():
  """sys.unraisablehook minus tensorstore's "RuntimeError: Event loop is closed": when an
  orbax save or restore fails, its asyncio loop closes while tensorstore still has
  callbacks pending, and each prints that traceback. They say nothing the error reported
  does not."""
  default_hook = sys.unraisablehook

  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      default_hook(unraisable)
  sys.unraisablehook = hook


def fail(message: str):
  """A config or input problem: one message on stderr, no traceback, exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl flag parsing whose errors (a bad flag, a bad config file or value) are one line
  and exit status 2."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as error:
    fail(" ".join(str(error).split()) or repr(error))


def named_fields(argv) -> set[str]:
  """Config fields set on the command line: {"data.seq_len", ...}."""
  return {arg[len("--config."):].split("=", 1)[0] for arg in argv if arg.startswith("--config.")}


def define_flags(*, multihost: bool = False, cpu_devices: int | None = devices.CPU_DEVICES):
  """--cpu_devices and --verbose (every program), and with `multihost` the flags of a
  job of several processes. Defined only by a program that runs (never at import), since
  the programs' flags share names. `cpu_devices=None`: the program sets the count itself
  (`set_cpu_devices`) once it knows what it needs, before its first JAX call."""
  flags.DEFINE_integer("cpu_devices", cpu_devices, "Virtual CPU devices (CPU backend only)"
                       + ("" if cpu_devices else "; default: as many as the chosen mesh "
                          "uses (one unless the ring is needed)") + ".")
  flags.DEFINE_bool("verbose", False, "Show the libraries' own logs (JAX, orbax, grain, "
                    "sentencepiece's trainer).")
  if multihost:
    flags.DEFINE_string("coordinator_address", os.environ.get("RINGLM_COORDINATOR"),
                        "host:port of process 0 (multi-host without a cluster manager); env "
                        "RINGLM_COORDINATOR.")
    flags.DEFINE_integer("num_processes", int(os.environ.get("RINGLM_NUM_PROCESSES", 1)),
                         "Processes in the job; env RINGLM_NUM_PROCESSES.")
    flags.DEFINE_integer("process_id", int(os.environ.get("RINGLM_PROCESS_ID", 0)),
                         "This process' index; env RINGLM_PROCESS_ID.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the "
                      "cluster's own discovery (automatic on TPU VMs and under SLURM).")


def tpu_attached() -> bool:
  """Whether this host has a TPU chip on its PCI bus (Google's vendor id, as JAX checks)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      if open(vendor).read().strip() == "0x1ae0":
        return True
    except OSError:
      pass
  return False


def pin_platforms() -> None:
  """With libtpu installed (the `tpu` extra, for compiling TPU programs here) on a host
  with no TPU, JAX would probe for one at its first call: libtpu prints warnings, and the
  process holds libtpu's lockfile for its whole life, which makes a concurrent TPU
  compilation (tools/aot.py) fail. Likewise the CUDA plugin (on the path to compile for a
  GPU host, docs/tpu.md) on a host without NVIDIA's driver fails to start CUDA. Such a host runs on its CPU (and
  its GPU, where there is one). JAX_PLATFORMS, when set, decides instead. Compile-only
  TPU and GPU devices (docs/tpu.md) work either way."""
  import importlib.util
  if os.environ.get("JAX_PLATFORMS") or tpu_attached():
    return
  cuda_plugin = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
  if importlib.util.find_spec("libtpu") is None and not cuda_plugin:
    return
  import jax
  gpu = cuda_plugin and os.path.exists("/dev/nvidiactl")
  jax.config.update("jax_platforms", "cuda,cpu" if gpu else "cpu")


def verbose() -> bool:
  return "verbose" in FLAGS and FLAGS.verbose


def start() -> set[str]:
  """The prologue of every program, after flag parsing and before any other JAX call:
  the multi-host start-up (when the program defined those flags), the CPU device count,
  the libraries' logs quiet unless --verbose. Returns the config fields the command line
  named (`named_fields`)."""
  if not verbose():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ INFO/WARNING lines
    for name in _QUIET_LOGGERS:
      logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(_not_from_orbax)
    _drop_closed_loop_tracebacks()
  import jax
  pin_platforms()
  if "num_processes" in FLAGS:
    cluster = any(name in os.environ for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                                   "TPU_WORKER_ID",
                                                   "MEGASCALE_COORDINATOR_ADDRESS"))
    if FLAGS.num_processes > 1:
      from parallel.mesh import initialize_distributed
      initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed or (cluster and int(os.environ.get("SLURM_NTASKS", 2)) > 1):
      jax.distributed.initialize()
  if FLAGS.cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  return named_fields(sys.argv)


def set_cpu_devices(count: int) -> int:
  """The virtual CPU devices of a program whose --cpu_devices has no default: `count`,
  unless the command line gave one (which `start` set). Before JAX's first call (else
  RuntimeError); calling it again with the same count changes nothing."""
  import jax
  if FLAGS.cpu_devices is not None:
    return FLAGS.cpu_devices
  if jax.config.jax_num_cpu_devices != count:
    jax.config.update("jax_num_cpu_devices", count)
  return count


def summary(lines) -> None:
  """The last words of a program on stdout: what ran, the figures, where the output is,
  what to try next."""
  print("\n".join(lines), flush=True)


def exit_without_collecting() -> None:
  """For a program whose work is done and written: the interpreter's exit then skips the
  garbage collection of every object left (gc.freeze; the memory goes back to the system
  as the process ends). Measured after serve.py's batch mode, ~200K objects: exit took
  0.40 s, 0.13 s frozen. Nothing of ringlm's relies on a finalizer at exit: outputs are
  closed and renamed before this."""
  import gc
  gc.freeze()
