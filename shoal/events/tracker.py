"""Which offset of a partition may be committed (pure)."""

from __future__ import annotations


class OffsetTracker:
    """Tracks handled offsets; the committable offset is the first one not yet handled.

    At-least-once: offsets may finish out of order (concurrent handlers), but the
    commit point only moves past an offset when every offset before it is handled.
    """

    def __init__(self, start: int) -> None:
        self.committable = start
        self._next = start
        self._done: set[int] = set()

    def dispatched(self, offset: int) -> None:
        """Record that ``offset`` was handed to a handler (offsets come in order)."""
        self._next = offset + 1

    def handled(self, offset: int) -> None:
        """Record that ``offset`` is finished (handled, dead-lettered or dropped)."""
        if offset == self.committable:
            self.committable += 1
            done = self._done
            while self.committable in done:
                done.remove(self.committable)
                self.committable += 1
        elif offset > self.committable:
            self._done.add(offset)

    @property
    def in_flight(self) -> int:
        """How many dispatched offsets are not yet handled."""
        return self._next - self.committable - len(self._done)
