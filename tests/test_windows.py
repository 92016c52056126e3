"""Token windows: fixed, aligned to UTC, calendar months and years."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from limits import parse_many

from reasoning_agent.windows import TokenWindow, token_windows

pytestmark = pytest.mark.database_agnostic


def at(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


def window(text: str) -> TokenWindow:
    return TokenWindow("token_budget", parse_many(text)[0])


@pytest.mark.parametrize(
    ("limit", "now", "start", "end"),
    [
        ("1/minute", at(2026, 12, 2, 0, 40, 59), at(2026, 12, 2, 0, 40), at(2026, 12, 2, 0, 41)),
        ("1/day", at(2026, 12, 31, 23, 59, 59), at(2026, 12, 31), at(2027, 1, 1)),
        ("1/day", at(2027, 1, 1), at(2027, 1, 1), at(2027, 1, 2)),
        ("1/month", at(2026, 12, 15, 12), at(2026, 12, 1), at(2027, 1, 1)),
        ("1/month", at(2028, 2, 29, 23), at(2028, 2, 1), at(2028, 3, 1)),  # a leap year
        ("1 per 2 months", at(2026, 12, 15), at(2026, 11, 1), at(2027, 1, 1)),
        ("1/year", at(2026, 6, 1), at(2026, 1, 1), at(2027, 1, 1)),
        ("1 per 5 minutes", at(2026, 12, 2, 0, 44), at(2026, 12, 2, 0, 40), at(2026, 12, 2, 0, 45)),
    ],
)
def test_a_window_starts_and_ends_on_utc_boundaries(
    limit: str, now: float, start: float, end: float
) -> None:
    index, begins, ends = window(limit).span(now)
    assert (begins, ends) == (start, end)
    assert window(limit).span(ends)[0] == index + 1  # its end is the next one's start
    assert window(limit).span(ends - 0.001)[0] == index


def test_a_window_is_named_without_its_limit_and_the_smaller_of_two_holds() -> None:
    windows = token_windows(parse_many("100/minute;50/minute"), parse_many("2000/day;1/month"))
    assert [(w.name, w.limit) for w in windows] == [
        ("token_rate:1-minute", 50),
        ("token_budget:1-day", 2000),
        ("token_budget:1-month", 1),
    ]
    # A rate and a budget over the same length are two windows, each with its own count.
    both = token_windows(parse_many("10/day"), parse_many("20/day"))
    assert [w.name for w in both] == ["token_rate:1-day", "token_budget:1-day"]
