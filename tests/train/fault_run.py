"""`opdkit train` (or `sft`) in a subprocess with one injected fault, for the kill/resume tests.

    python -m tests.train.fault_run {train|sft} MODE ARG -- key=value ...

MODE: none; kill_after_step K (SIGKILL itself right after the record of step K was logged); term_after_step K
(SIGTERM itself there: the graceful-stop path); kill_in_save N (SIGKILL itself at the N-th fsync of a checkpoint
file, i.e. inside a checkpoint write). Exits with the trainer's exit code.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    cmd, mode, arg = argv[0], argv[1], int(argv[2])
    overrides = argv[argv.index("--") + 1:]
    from opdkit import checkpoint, metrics_log as logging

    if mode in ("kill_after_step", "term_after_step"):
        sig = signal.SIGKILL if mode == "kill_after_step" else signal.SIGTERM
        real_log = logging.MetricsLogger.log

        def log(self, step, metrics):
            rec = real_log(self, step, metrics)
            if step == arg and "loss" in rec:
                os.kill(os.getpid(), sig)
            return rec

        logging.MetricsLogger.log = log
    elif mode == "kill_in_save":
        real_fsync = checkpoint._fsync_file
        calls = {"n": 0}

        def fsync(path):
            calls["n"] += 1
            if calls["n"] == arg:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_fsync(path)

        checkpoint._fsync_file = fsync
    elif mode != "none":
        raise SystemExit(f"unknown mode {mode}")
    if cmd == "train":
        from opdkit.train.loop import main as run
    else:
        from opdkit.train.sft import main as run
    return run(overrides)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
