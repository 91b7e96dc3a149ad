"""LM Studio's model API in memory, for the model guard's tests and those of the parts
around it (the sharing gate): what is on disk, what is loaded, loads that wait for a test's
go, every call counted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable

from tray_app.gateway import api_errors as errors
from tray_app.gateway.api_errors import ApiError
from tray_app.gateway.upstream.model_api import ModelStates

A, B, C = "qwen2.5-7b-instruct", "llama-3.2-1b-instruct", "gemma-3-4b"


class MemoryModelApi:
    """LM Studio's model API in memory: one model fits (a load evicts the others), loads
    wait for ``go`` when a test holds them, and every call is counted."""

    def __init__(self, downloaded: Iterable[str] = (A, B, C), loaded: Iterable[str] = (A,)):
        self.downloaded = set(downloaded)
        self.in_memory = set(loaded)
        self.reads = 0
        self.loads: Counter[str] = Counter()
        self.load_timeouts: list[float] = []
        self.loads_ended = 0  # loads that returned, failed or were cancelled
        self.no_api = False
        self.read_failure: ApiError | None = None
        self.failing_reads: set[int] = set()  # these reads (1 = the first) fail
        self.load_failure: ApiError | None = None
        self.load_forgets = False  # answers the load, yet does not list the model loaded
        self.go: asyncio.Event | None = None  # set: loads wait for it
        self.read_go: asyncio.Event | None = None
        self.loading = asyncio.Event()

    async def loaded(self) -> ModelStates | None:
        self.reads += 1
        if self.read_go is not None:
            await self.read_go.wait()
        if self.read_failure is not None:
            raise self.read_failure
        if self.reads in self.failing_reads:
            raise errors.upstream_failed("the connection was reset")
        if self.no_api:
            return None
        return ModelStates(frozenset(self.downloaded), frozenset(self.in_memory))

    async def load(self, model: str, timeout: float) -> None:
        self.loads[model] += 1
        self.load_timeouts.append(timeout)
        self.loading.set()
        try:
            if self.go is not None:
                await self.go.wait()
            if self.load_failure is not None:
                raise self.load_failure
            self.in_memory = set() if self.load_forgets else {model}
        finally:
            self.loads_ended += 1

    def hold_loads(self) -> asyncio.Event:
        self.go = asyncio.Event()
        return self.go
