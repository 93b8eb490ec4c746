"""A quiet console for `sim.run`: progress bars and the summary there, the noise of Ray and gRPC in a log file.

gRPC's C core writes straight to file descriptor 2 (``fork_posix.cc`` notices each time Ray forks a
process), Ray's driver thread prints the raylet's warnings ("N PYTHON worker processes") to
``sys.stdout``, and Ray's logger (the token-auth notice) to whatever ``sys.stderr`` is when it logs,
or, once ``ray.init`` has cleared its handlers, to logging's last resort (``sys.stderr`` too). So
while a run is on, descriptors 1 and 2 point at a log file in the run's folder, log records with no
handler of their own (Ray's and this package's warnings) go there too, and only ``sys.stderr`` (the
progress bars) goes to the console it was; the summary and any error line are printed after the run.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from pathlib import Path

# gRPC reads these once, when its core loads: set before grpc is imported (sim/__init__.py does),
# and handed to Ray workers on a cluster (sim.actors.ray_init_options). Fork support off: Ray's
# forks exec at once and need no gRPC fork handlers, whose notices are the noise.
GRPC_QUIET_ENV = {"GRPC_VERBOSITY": "ERROR", "GRPC_ENABLE_FORK_SUPPORT": "false"}


def quiet_grpc_env() -> None:
    """Default gRPC to errors only and no fork handlers in this process (a value already set wins)."""
    for key, value in GRPC_QUIET_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def noise_to(path: Path):
    """Send whatever is written to file descriptors 1 and 2 to ``path`` (written afresh), keeping
    ``sys.stderr`` on the console, until the block ends. Yields the path.

    Without real descriptors behind ``sys.stdout`` and ``sys.stderr`` (a test capturing them)
    nothing is redirected.
    """
    try:
        for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
            stream.flush()
            if stream.fileno() != fd:
                raise io.UnsupportedOperation
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
    saved_stderr = sys.stderr
    with open(path, "wb") as log_file:
        for fd in saved_fds:
            os.dup2(log_file.fileno(), fd)
    to_log = logging.StreamHandler(saved_stderr)  # descriptor 2: the log file
    to_log.setLevel(logging.WARNING)  # as the last resort it stands in for
    ray_log = logging.getLogger("ray")
    ray_handlers, last_resort = ray_log.handlers[:], logging.lastResort
    # line buffered, as stderr is: a progress bar or an error line shows at once
    with open(saved_fds[2], "w", buffering=1, encoding=saved_stderr.encoding, errors="backslashreplace",
              closefd=False) as console:
        sys.stderr = console
        ray_log.handlers, logging.lastResort = [to_log], to_log
        try:
            yield path
        finally:
            ray_log.handlers[:], logging.lastResort = ray_handlers, last_resort
            console.flush()  # while its descriptor is still open
            sys.stderr = saved_stderr
            sys.stdout.flush()
            for fd, saved in saved_fds.items():
                os.dup2(saved, fd)
                os.close(saved)


@contextlib.contextmanager
def console_stdout():
    """A text stream on the console's stdout that stays there while :func:`noise_to` sends
    descriptor 1 to a log (a duplicate of descriptor 1, taken on entry); ``sys.stdout`` itself
    when it has no real descriptor (a test capturing it)."""
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        yield sys.stdout
        return
    with open(os.dup(fd), "w", buffering=1, encoding=sys.stdout.encoding, errors="backslashreplace") as out:
        yield out
