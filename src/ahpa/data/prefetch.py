"""Gathering the host side of upcoming batches in a background thread while the current step computes.

A cache source's host work (a memmap gather, into pinned buffers on CUDA) needs nothing from the step
before it: which rows a step reads is a function of (seed, step) (ahpa.data.order). So one worker thread
gathers the requests that come next, in the order they will be asked for, and the training thread only
starts the copies to the device. A request that is not the next planned one is left to the caller to
serve synchronously, and prefetching stops: a batch is the same whether or not it was prefetched.
"""

from __future__ import annotations

import functools
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

import torch

Request = tuple[torch.Tensor, torch.Tensor]  # (sample indices int64 [b], flips bool [b])
T = TypeVar("T")


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None and b is None or a is not None and b is not None and torch.equal(a, b)


class Prefetcher(Generic[T]):
    """Runs `gather(idx, flip)` one step ahead for the requests `plan(step)` names, from `step` on.

    `take(idx, flip)` returns the gathered result of the next planned request when (idx, flip) is that
    request; an exception raised by `gather` in the worker is raised there, as it was raised. Otherwise it
    returns None and stops (the caller gathers synchronously). `close()` cancels what has not started and
    waits for what has; an idle worker also ends when the Prefetcher is garbage-collected.
    """

    def __init__(self, gather: Callable[[torch.Tensor, torch.Tensor], T], plan: Callable[[int], list[Request]],
                 step: int, device: torch.device):
        self._gather, self._plan, self._next_step = gather, plan, step
        self._per_step = len(plan(step))
        self._queue: deque[tuple[torch.Tensor, torch.Tensor, Future]] = deque()
        init = None
        if device.type == "cuda":
            # pinned allocations are made in the current device's context: without this the worker would make
            # them in GPU 0's (and create a context there) on every rank of a multi-GPU run
            index = device.index if device.index is not None else torch.cuda.current_device()
            init = functools.partial(torch.cuda.set_device, index)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ahpa-prefetch", initializer=init)
        self.active = True
        self.hits = self.misses = 0
        self._top_up()

    def _top_up(self) -> None:
        """Keep a whole step's requests queued beyond the one being taken: the worker never waits for the step."""
        while self.active and len(self._queue) < self._per_step:
            for idx, flip in self._plan(self._next_step):
                self._queue.append((idx, flip, self._pool.submit(self._gather, idx, flip)))
            self._next_step += 1

    def take(self, idx: torch.Tensor, flip: torch.Tensor | None) -> T | None:
        if not self.active:
            return None
        if self._queue and _same(self._queue[0][0], idx) and _same(self._queue[0][1], flip):
            future = self._queue.popleft()[2]
            self._top_up()  # queue the next step before waiting on this one
            self.hits += 1
            return future.result()
        self.misses += 1
        self.close()  # the caller left the plan: rows gathered from now on would go unused
        return None

    def close(self) -> None:
        self.active = False
        for _, _, future in self._queue:
            future.cancel()
        self._queue.clear()
        self._pool.shutdown(wait=True)
