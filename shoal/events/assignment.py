"""Which member of a consumer group owns which partition (pure)."""

from __future__ import annotations


def assigned_partitions(member: str, members: list[str], partitions: int) -> set[int]:
    """The partitions ``member`` should own: round robin over the sorted member list.

    Every member computes the same answer from the same membership, so no leader is
    needed; ownership itself is then claimed with a leased compare-and-set, so two
    members never own a partition at once, even while their views of membership differ.
    """
    ordered = sorted(set(members))
    if member not in ordered:
        return set()
    index, count = ordered.index(member), len(ordered)
    return {p for p in range(partitions) if p % count == index}
