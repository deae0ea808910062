"""The overlap check's path index (``routes._path_candidates``) never leaves out an earlier
route whose path condition is not disjoint from a later one's: checked against every pair."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.gateway.routes import Relation, Route, _path_candidates

SEGMENTS = st.sampled_from(["a", "b", "ab", "a%2F", "", "x.y"])


@st.composite
def path_conditions(draw: st.DrawFn) -> dict[str, str] | None:
    kind = draw(st.sampled_from(["exact", "prefix", "regex", "any"]))
    if kind == "any":
        return None
    path = "/" + "/".join(draw(st.lists(SEGMENTS, min_size=0, max_size=3)))
    if kind == "regex":
        return {"regex": draw(st.sampled_from(["/a/[^/]+", "/b", "/a", "/[ab]+"]))}
    if kind == "prefix" and draw(st.booleans()):
        path += "/"
    return {kind: path}


@settings(max_examples=100, deadline=None)
@given(st.lists(path_conditions(), min_size=1, max_size=12))
def test_index_keeps_every_related_pair(paths: list[dict[str, str] | None]) -> None:
    # routes built one by one: a table would refuse the shadowed ones this test wants
    routes = tuple(Route.from_config({"service": "s", "match": {"path": p} if p else None},
                                     i) for i, p in enumerate(paths))
    related = _path_candidates(routes)
    for j, later in enumerate(routes):
        expected = [i for i in range(j) if routes[i].matcher.path.relation(
            later.matcher.path) is not Relation.DISJOINT]
        got = related(j)
        assert set(expected) <= set(got), (paths, j, expected, got)
        assert got == sorted(got) and all(i < j for i in got)
