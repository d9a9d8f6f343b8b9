"""Micro-batching: concurrent requests share one ONNX Runtime call.

A request queues its preprocessed image and awaits a future. The batching loop takes the first waiting request,
lets up to ``max_wait_s`` pass for others to join (never more than ``max_batch``), captures the served model
once, scores the batch in a worker thread and resolves every future with its probability and that model. A model
swap during the call does not touch the batch: it holds its own reference to the model that scores it. A request
may name its model (a rollout's challenger): the batch is then scored in one call per model.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from pipeline.data.preprocessing import Preprocessing
from pipeline.serving.model_source import LiveModel, ServedModel


@dataclass(frozen=True)
class Scored:
    probability: float
    model: ServedModel  # the version that computed it


@dataclass(frozen=True)
class _Waiting:
    pixels: np.ndarray  # decoded uint8, kept to re-preprocess if the scoring model's preprocessing differs
    inputs: np.ndarray  # (1, S, S) float32, preprocessed for the model served when the request arrived
    preprocessing: Preprocessing  # how ``inputs`` were made
    model: ServedModel | None  # None: whatever is served when its batch runs
    future: asyncio.Future[Scored]


class MicroBatcher:
    def __init__(
        self,
        live: LiveModel,
        max_batch: int,
        max_wait_s: float,
        executor: Executor,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.live = live
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.executor = executor
        self.on_batch = on_batch
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._arrived = asyncio.Event()

    async def score(
        self, pixels: np.ndarray, inputs: tuple[np.ndarray, Preprocessing], model: ServedModel | None = None
    ) -> Scored:
        """``inputs``: the preprocessed image and how it was made (re-made if the scoring model differs)."""
        future: asyncio.Future[Scored] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(pixels, *inputs, model, future))
        self._arrived.set()
        return await future

    async def run(self) -> None:
        """The batching loop; runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.max_wait_s
            while len(self._waiting) < self.max_batch and (remaining := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            batch = [waiting for waiting in batch if not waiting.future.done()]  # callers gone (disconnected)
            if not batch:
                continue
            served = self.live.current  # once per batch: every request in it is answered by this version
            by_model: dict[int, tuple[ServedModel, list[_Waiting]]] = {}
            for waiting in batch:
                model = waiting.model or served
                by_model.setdefault(id(model), (model, []))[1].append(waiting)
            for model, members in by_model.values():
                await self._run(loop, model, members)

    async def _run(self, loop: asyncio.AbstractEventLoop, model: ServedModel, batch: list[_Waiting]) -> None:
        self.on_batch(len(batch))
        try:
            probabilities = await loop.run_in_executor(self.executor, _score, model, batch)
        except Exception as exc:  # an inference failure fails this batch's requests, not the loop
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        for waiting, probability in zip(batch, probabilities, strict=True):
            if not waiting.future.done():
                waiting.future.set_result(Scored(float(probability), model))


def _score(model: ServedModel, batch: list[_Waiting]) -> np.ndarray:
    wanted = model.preprocessing
    inputs = [
        waiting.inputs if waiting.preprocessing == wanted else wanted.model_input(waiting.pixels) for waiting in batch
    ]
    return model.predict(np.stack(inputs))
