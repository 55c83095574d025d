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

import logging
import os
import sys

from absl import flags

FLAGS = flags.FLAGS

# Libraries whose INFO logs a user does not need (--verbose brings them back).
_QUIET_LOGGERS = ("absl", "jax", "orbax", "grain", "etils", "tensorstore", "jax._src")


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


def define_flags(*, multihost: bool = False):
  """--cpu_devices and --verbose (every program), and with `multihost` the flags of a
  job of several processes. Defined only by a program that runs (never at import), since
  the programs' flags share names."""
  flags.DEFINE_integer("cpu_devices", 8, "Virtual CPU devices (CPU backend only).")
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
  import jax
  if "num_processes" in FLAGS:
    cluster = any(name in os.environ for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                                   "TPU_WORKER_ID",
                                                   "MEGASCALE_COORDINATOR_ADDRESS"))
    if FLAGS.num_processes > 1:
      from parallel.mesh import initialize_distributed
      initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed or (cluster and int(os.environ.get("SLURM_NTASKS", 2)) > 1):
      jax.distributed.initialize()
  jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  return named_fields(sys.argv)


def summary(lines) -> None:
  """The last words of a program on stdout: what ran, the figures, where the output is,
  what to try next."""
  print("\n".join(lines), flush=True)
