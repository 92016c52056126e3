"""KEY_POLICIES_FILE: per-key limits and models over the defaults, checked at start, re-read."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from reasoning_agent.config import ConfigError, Settings
from reasoning_agent.policies import Policies

pytestmark = pytest.mark.database_agnostic

TEAM_A = """
keys:
  team-a:
    rate_limit: 120/minute
    query_rate_limit: 1200/minute
    token_rate_limit: 200000/minute
    token_budget: 10000000/day;200000000/month
    models: [gpt-4o-mini, o4-mini]   # any other model is a 403
  team-b:
    token_budget: 5000/day
"""


def policies(tmp_path: Path, text: str, **env: str) -> Policies:
    file = tmp_path / "policies.yaml"
    file.write_text(text)
    return Policies(Settings(key_policies_file=file, **env))  # type: ignore[arg-type]


def test_a_keys_own_policy_overrides_the_defaults_field_by_field(tmp_path: Path) -> None:
    book = policies(tmp_path, TEAM_A, token_rate_limit="1000/minute", rate_limit="10/minute")
    team_a = book.of("team-a")
    assert [str(item) for item in team_a.rate_limits] == ["120 per 1 minute"]
    assert [str(item) for item in team_a.query_rate_limits] == ["1200 per 1 minute"]
    assert [(w.name, w.limit) for w in team_a.token_windows] == [
        ("token_rate:1-minute", 200000),
        ("token_budget:1-day", 10000000),
        ("token_budget:1-month", 200000000),
    ]
    assert team_a.allows("o4-mini") and not team_a.allows("gpt-4o")
    # team-b sets only a budget: its rates are the defaults, and any model will do.
    team_b = book.of("team-b")
    assert [str(item) for item in team_b.rate_limits] == ["10 per 1 minute"]
    assert [(w.name, w.limit) for w in team_b.token_windows] == [
        ("token_rate:1-minute", 1000),
        ("token_budget:1-day", 5000),
    ]
    assert team_b.allows("anything")
    assert book.of("nobody") is book.default
    assert book.names == ["team-a", "team-b"]


def test_json_works_as_well(tmp_path: Path) -> None:
    book = policies(tmp_path, json.dumps({"keys": {"ci": {"token_budget": "10/day"}}}))
    assert [w.limit for w in book.of("ci").token_windows] == [10]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys:\n  team-a:\n    token_budget: lots\n", "keys.team-a.token_budget: expected limits"),
        ("keys:\n  team-a:\n    rate_limt: 1/minute\n", "keys.team-a.rate_limt: Extra inputs"),
        (
            "keys:\n  team-a:\n    models: gpt-4o\n",
            "keys.team-a.models: Input should be a valid list",
        ),
        ("keys:\n  team-a:\n    models: []\n", "keys.team-a.models: List should have at least 1"),
        ("keys: [team-a]\n", "keys: Input should be a valid dictionary"),
        ("teams: {}\n", "teams: Extra inputs"),
        ("keys: {team-a: {token_budget: 1/day}\n", "not YAML or JSON"),
    ],
)
def test_a_bad_file_refuses_to_start_naming_the_key_and_the_field(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=r"^KEY_POLICIES_FILE: ") as refused:
        policies(tmp_path, text)
    assert message in str(refused.value)


def test_a_changed_file_applies_without_a_restart_and_a_bad_one_keeps_the_last_good(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    book = policies(tmp_path, TEAM_A)
    file = tmp_path / "policies.yaml"
    staged = tmp_path / "policies.new"  # as Kubernetes swaps a ConfigMap's file: by a rename
    staged.write_text("keys:\n  team-a:\n    token_budget: 7/day\n")
    staged.replace(file)
    time.sleep(1.1)  # past the re-read interval
    assert [w.limit for w in book.of("team-a").token_windows] == [7]
    assert book.of("team-a").models is None

    file.write_text("keys:\n  team-a:\n    token_budget: seven\n")
    time.sleep(1.1)
    with caplog.at_level(logging.WARNING, logger="reasoning_agent.policies"):
        assert [w.limit for w in book.of("team-a").token_windows] == [7]
    assert "KEY_POLICIES_FILE rejected, keeping the last good one" in caplog.text
    assert "keys.team-a.token_budget" in caplog.text
