"""`AsyncRollout`: the rollouts of the next steps are generated while the current step trains (asynchronous OPD).

A producer thread calls `produce(step)` for steps start, start+1, ... in order, at most `max_staleness` steps
ahead of the trainer: it generates the batch of step s once the trainer has applied update s - max_staleness - 1
(the trainer's version is >= s - max_staleness). The trainer takes a step's batch with `get(step)` and, after its
optimizer step, pushes the new weights with `push(fn)`; pushes and productions take one lock, so a row is never
sampled with weights that change under it. With max_staleness=0 the producer only starts step s after update
s-1: the same batches, in the same order, with the same weights as the synchronous loop (tested bit-equal).
Staleness of a row = the trainer's version when it trains on the row - the version that sampled it (<=
max_staleness + weight_sync_steps - 1). This follows verl's async OPD and TRL's AsyncDistillationTrainer
(`max_staleness`), NeMo-RL's async GRPO: a bounded queue between a generator and the trainer.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class AsyncRollout:
    def __init__(self, produce: Callable[[int], object], *, start_step: int, end_step: int, max_staleness: int):
        self.produce, self.max_staleness = produce, int(max_staleness)
        self.end_step = int(end_step)
        self.trainer_version = int(start_step)
        self.lock = threading.Lock()  # held while producing and while pushing weights
        self._cv = threading.Condition()
        self._ready: dict[int, tuple[object, float]] = {}
        self._closed = False
        self._gen_s = 0.0
        self._waits: list[float] = []
        self._thread = threading.Thread(target=self._run, args=(int(start_step),), daemon=True,
                                        name="opdkit-async-rollout")
        self._thread.start()

    def _run(self, step: int) -> None:
        while step < self.end_step:
            with self._cv:
                while not self._closed and step - self.trainer_version > self.max_staleness:
                    self._cv.wait()
                if self._closed:
                    return
            t0 = time.perf_counter()
            try:
                with self.lock:
                    result = self.produce(step)
            except BaseException as e:  # handed to the trainer, which raises it in its own thread
                result = e
            with self._cv:
                self._ready[step] = (result, time.perf_counter() - t0)
                self._cv.notify_all()
            if isinstance(result, BaseException):
                return
            step += 1

    def get(self, step: int):
        """The batch of `step` (blocks until produced); returns (result, seconds the trainer waited, seconds it took
        to generate). A producer exception is raised here."""
        t0 = time.perf_counter()
        with self._cv:
            while step not in self._ready and not self._closed:
                self._cv.wait(timeout=1.0)
                if not self._thread.is_alive() and step not in self._ready:
                    raise RuntimeError(f"the rollout producer stopped before step {step}")
            result, gen_s = self._ready.pop(step)
            depth = len(self._ready)
        waited = time.perf_counter() - t0
        if isinstance(result, BaseException):
            raise result
        self._waits.append(waited)
        self._depth = depth
        return result, waited, gen_s

    def push(self, fn: Callable[[], None], version: int) -> None:
        """Run `fn` (a weight push) under the production lock, then let the producer run up to `version +
        max_staleness`."""
        with self.lock:
            fn()
        with self._cv:
            self.trainer_version = int(version)
            self._cv.notify_all()

    def stats(self) -> dict:
        return {"rollout/queue_depth": getattr(self, "_depth", 0)}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
