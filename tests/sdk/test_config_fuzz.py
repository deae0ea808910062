"""Property: any text is either a manifest or a ManifestError with file and line; nothing
else escapes, and nothing takes long."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.config import ManifestError, parse_manifest

TOKENS = st.sampled_from([
    "broker", "store", "services", "gateway", "admin", "security", "routes", "listen",
    "app", "replicas", "autoscale", "min", "max", "cooldown", "policy", "retries",
    "attempts", "load_balancer", "labels", "env", "mtls", "a", "m:s", "1", "-1", "2s",
    "policies", "topics", "publish", "subscribe", "action", "deny", "from", "paths",
    "trust_domain", "prefix", "a.*",
    "null", "true", "off", "~", "&x", "*x", "<<", "!!str", "!!python/name:os.system",
    "[", "]", "{", "}", ",", ":", ": ", "- ", "\n", "\n  ", "\n    ", " ", "'", '"', "#",
    "---", "...", "\t", "é", "\x00", "%YAML 1.1", "0.0.0.0:80", "memory://x", "x-a",
])


def check(text: str) -> None:
    started = time.monotonic()
    try:
        parse_manifest(text, "fuzz.yaml")
    except ManifestError as e:
        assert e.issues, text
        for issue in e.issues:
            assert str(issue).startswith("fuzz.yaml"), (text, str(issue))
    assert time.monotonic() - started < 2, text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TOKENS, max_size=40).map("".join))
def test_token_soup_is_a_manifest_or_a_clear_error(text: str) -> None:
    check(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4),
    max_leaves=30))
def test_any_yaml_value_under_any_section_is_a_manifest_or_a_clear_error(value: object) -> None:
    import yaml

    section = ("services", "gateway", "admin", "security", "broker")[len(repr(value)) % 5]
    check(yaml.safe_dump({section: value}))
    check(yaml.safe_dump({"services": {"a": {"app": "m:s", "policy": value}}}))
    check(yaml.safe_dump({"services": {"a": {"app": "m:s", "autoscale": value}}}))
