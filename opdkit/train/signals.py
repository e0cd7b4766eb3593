"""Graceful stop on SIGINT / SIGTERM for the trainers.

Schedulers (SLURM, Kubernetes) send SIGTERM before they kill a job; a person presses Ctrl-C (SIGINT). Both behave
the same way: the first signal asks the run to stop after the step in progress, which then writes a checkpoint and
exits with a one-line message (exit code 128 + signal number: 130 for SIGINT, 143 for SIGTERM); a second signal
stops at once (the last checkpoint is still intact: checkpoints are atomic). Either way `resume=true` continues the
run exactly.
"""

from __future__ import annotations

import signal
import sys
import threading


class Interrupted(KeyboardInterrupt):
    """Raised by a trainer that stopped on a signal; `opdkit.errors.run_cli` prints `message` and returns
    128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)
        self.message = message


class GracefulStop:
    """`with GracefulStop() as stop:` ... `if stop.requested: <checkpoint>; raise stop.interrupted(...)`.

    Handlers are installed only in the main thread (signals are delivered there) and the previous ones are restored
    on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stream=None):
        self.requested: int | None = None
        self._old: dict[int, object] = {}
        self._stream = stream

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested is not None:
            raise Interrupted(signum, f"opdkit: stopped by {signal.Signals(signum).name} (second signal); resume "
                                      "from the last checkpoint with resume=true")
        self.requested = signum
        print(f"opdkit: {signal.Signals(signum).name} received: stopping after this step with a checkpoint "
              "(send it again to stop now)", file=self._stream or sys.stderr, flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def interrupted(self, message: str) -> Interrupted:
        return Interrupted(self.requested or signal.SIGINT, message)
