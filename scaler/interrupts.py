"""One clean stop for every command: SIGTERM (SLURM's and other schedulers' stop) raises
KeyboardInterrupt while a block runs, as Ctrl-C does, so each command's own stop (a message that
says what was saved, locks released, exit 130) runs for both."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM raises KeyboardInterrupt inside the block; the previous handler comes back after it.
    A no-op off the main thread, whose handlers signals run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
