"""Warm pools: instances of a preset started ahead of demand, handed out by `start_instance`.

A pooled instance is an ordinary instance in state `pooled`, that no client has been given: it
counts against capacity like any other, and it never ran a command, so handing it out is as good
as a fresh start. The broker refills a pool on its tick, only while no client start waits for
room, and evicts pooled instances when a client start of another kind needs their room: pools use
capacity nobody asked for, they never take it from anybody.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, overload

from .state import Instance, State

# After a pool's start fails (bad image, no agent for the type), the next try waits this long,
# doubling to the cap, so that a broken preset does not start and fail in a tight loop.
RETRY_S = (1.0, 60.0)


@dataclass
class WarmPool:
    preset: str
    target: int
    ready: list[Instance] = field(default_factory=list)  # started, waiting to be handed out, oldest first
    starting: set[str] = field(default_factory=set)      # ids of its starts in flight
    retry_at: float = 0.0
    retry_s: float = RETRY_S[0]
    handed_out: int = 0

    def missing(self) -> int:
        return self.target - len(self.ready) - len(self.starting)

    def describe(self) -> dict[str, int]:
        return {"target": self.target, "ready": len(self.ready), "starting": len(self.starting),
                "handed_out": self.handed_out}


class WarmPools:
    """Every pool, by preset name; owned by the broker loop. `instances` is the broker's own table
    (instance id -> Instance): a pool's instance that left it (lost with its agent, a start that
    timed out) is dropped when the pool is next looked at."""

    def __init__(self, targets: dict[str, int], instances: dict[str, Instance]) -> None:
        self.pools = {preset: WarmPool(preset, count) for preset, count in targets.items() if count > 0}
        self.instances = instances

    def take(self, preset: str) -> Instance | None:
        """A ready instance of the preset for a client, or None (no pool, or it is empty)."""
        pool = self._pruned(self.pools.get(preset))
        if pool is None or not pool.ready:
            return None
        pool.handed_out += 1
        return pool.ready.pop(0)

    def started(self, inst: Instance, ok: bool, now: float) -> None:
        """A start ended: a pool's instance is ready, or the pool's next try waits a while."""
        pool = self.pools.get(inst.pooled_for) if inst.pooled_for else None
        if pool is None:
            return
        pool.starting.discard(inst.instance_id)
        if ok:
            pool.ready.append(inst)
            pool.retry_s = RETRY_S[0]
        else:
            pool.retry_at = now + pool.retry_s
            pool.retry_s = min(pool.retry_s * 2, RETRY_S[1])

    def to_refill(self, now: float) -> list[WarmPool]:
        return [p for p in map(self._pruned, self.pools.values()) if p.missing() > 0 and now >= p.retry_at]

    def victim(self, sparing: str | None, may_go: Callable[[Instance], bool]) -> Instance | None:
        """A ready instance to close so that a client's start fits (one `may_go` allows), from the
        fullest pool other than the preset asked for (whose own ready one would have been taken)."""
        candidates = [(len(p.ready), inst, p) for p in map(self._pruned, self.pools.values()) if p.preset != sparing
                      for inst in p.ready if may_go(inst)]
        if not candidates:
            return None
        _, inst, pool = max(candidates, key=lambda c: c[0])
        pool.ready.remove(inst)
        return inst

    def describe(self) -> dict[str, Any]:
        return {preset: self._pruned(pool).describe() for preset, pool in self.pools.items()}

    @overload
    def _pruned(self, pool: WarmPool) -> WarmPool: ...
    @overload
    def _pruned(self, pool: None) -> None: ...
    @overload
    def _pruned(self, pool: WarmPool | None) -> WarmPool | None: ...

    def _pruned(self, pool: WarmPool | None) -> WarmPool | None:
        if pool is not None:
            pool.ready = [i for i in pool.ready if i.state == State.POOLED and self.instances.get(i.instance_id) is i]
            pool.starting = {i for i in pool.starting if getattr(self.instances.get(i), "state", None) == State.STARTING}
        return pool
