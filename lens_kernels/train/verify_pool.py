"""Run a judging function in worker processes, each answer under a wall-clock deadline.

math-verify guards itself with ``signal.alarm``, which only works on a main thread and cannot
interrupt C code (a huge integer power, say).  Here every judgement runs on the main thread of
a child process, so math-verify's own alarm works there, and the parent additionally kills any
child that overruns its deadline and starts a fresh one.  The trainer can therefore neither
hang nor lose a score silently: every answer comes back with a status, ``"timeout"`` and
``"error"`` included, and the caller counts and logs those.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Callable, Optional, Sequence

Judge = Callable[[str, str], tuple]  # (gold, answer) -> (status, detail); top-level, picklable
STARTUP_TIMEOUT = 300.0  # seconds for a worker to import its judge's dependencies


def _worker_main(conn, judge: Judge) -> None:
    prepare = getattr(judge, "prepare", None)
    if prepare is not None:
        prepare()  # imports happen here, before the first deadline starts
    conn.send("ready")
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        try:
            result = judge(*item)
        except Exception as exc:  # a judge bug must not take the worker down
            result = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(result)


class _Worker:
    def __init__(self, ctx, judge: Judge):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, judge), daemon=True)
        self.process.start()
        child.close()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.conn.poll(STARTUP_TIMEOUT) or self.conn.recv() != "ready":
            raise RuntimeError(f"verifier worker did not start within {STARTUP_TIMEOUT:g} s")
        self.ready = True

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class JudgePool:
    """``workers`` child processes running ``judge``; ``run`` returns one result per item.

    A judge may define ``prepare()``: it runs once in each worker before the worker reports
    ready, so slow imports never count against an answer's deadline.
    """

    def __init__(self, judge: Judge, timeout: float, workers: int = 1):
        if timeout <= 0:
            raise ValueError(f"timeout: expected > 0 seconds, got {timeout}")
        self.judge, self.timeout = judge, timeout
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx, judge) for _ in range(max(1, workers))]
        self.restarts = 0

    def _replace(self, index: int) -> None:
        self._workers[index].kill()
        self._workers[index] = _Worker(self._ctx, self.judge)
        self.restarts += 1

    def run(self, items: Sequence[tuple[str, str]]) -> list[tuple]:
        results: list[Optional[tuple]] = [None] * len(items)
        pending = deque(range(len(items)))
        busy: dict[int, tuple[int, float]] = {}  # worker index -> (item index, deadline)
        while pending or busy:
            for w in range(len(self._workers)):
                if w not in busy and pending:
                    item = pending.popleft()
                    self._workers[w].wait_ready()
                    self._workers[w].conn.send(items[item])
                    busy[w] = (item, time.monotonic() + self.timeout)
            next_deadline = min(deadline for _, deadline in busy.values())
            ready = wait(
                [self._workers[w].conn for w in busy],
                timeout=max(0.0, next_deadline - time.monotonic()),
            )
            for w in list(busy):
                item, deadline = busy[w]
                if self._workers[w].conn in ready:
                    try:
                        results[item] = self._workers[w].conn.recv()
                    except (EOFError, OSError):
                        results[item] = ("error", "verifier worker died")
                        self._replace(w)
                    del busy[w]
                elif time.monotonic() >= deadline:
                    results[item] = ("timeout", f"killed after {self.timeout:g} s")
                    self._replace(w)
                    del busy[w]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.kill()
        self._workers = []

    def __enter__(self) -> "JudgePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
