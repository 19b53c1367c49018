"""SIGINT and SIGTERM as an exception, and child processes that never outlive the run.

``install()`` (called by the CLI) turns both signals into ``Interrupted``, a ``KeyboardInterrupt``: the run stops
where it is, every ``finally`` on the way out runs (``atomic_path`` removes its temporary file or folder, shard
writers delete their ``.tmp`` shards, ``popen`` children are stopped), and the CLI records the interruption in
the run's ``status.json`` and exits 128 + the signal number (130 for SIGINT, 143 for SIGTERM). The signal is
also remembered: one that was swallowed (an exception ignored in a destructor) is raised again by ``check()``
at the next stage, encoding batch or checkpoint.

Child processes (the JVM, the Lucene indexers) start in their own process group, so a terminal's Ctrl-C reaches
only lsr-run, which stops each group in a ``finally``; on Linux they also get SIGKILL when lsr-run dies without
cleaning up (SIGKILL, OOM killer).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: int | None = None
_stage: str | None = None


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum: int, frame) -> None:
    global _received
    if _received is None:
        _received = signum
    raise Interrupted(signum)


def install() -> bool:
    """Route SIGINT and SIGTERM to ``Interrupted`` (main thread only; elsewhere a no-op returning False)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    return True


def check() -> None:
    """Raise ``Interrupted`` again if a signal arrived (its first exception may have been swallowed)."""
    if _received is not None:
        raise Interrupted(_received)


def reset() -> None:
    global _received, _stage
    _received, _stage = None, None


def set_stage(stage: str | None) -> None:
    """Record the stage in progress (named in the status file when the run is interrupted); raises
    ``Interrupted`` if a signal is pending."""
    global _stage
    check()
    _stage = stage


def stage() -> str | None:
    return _stage


# ---------------------------------------------------------------- child processes

def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def popen(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new process group (and, on Linux, killed if lsr-run dies): stop it with
    ``stop`` in a ``finally``."""
    if sys.platform.startswith("linux"):
        kwargs.setdefault("preexec_fn", _die_with_parent)
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Stop every still-running process group in ``procs``: SIGTERM, then SIGKILL after ``grace`` seconds."""
    alive = [p for p in procs if p.poll() is None]
    if not alive:
        return
    # a second Ctrl-C must not cut this short: signals wait until every child is gone
    blocked = threading.current_thread() is threading.main_thread()
    if blocked:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        for p in alive:
            _kill_group(p, signal.SIGTERM)
        for p in alive:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill_group(p, signal.SIGKILL)
                p.wait()
        log.info("stopped %d child process(es)", len(alive))
    finally:
        if blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def _kill_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
