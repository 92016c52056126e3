"""Token windows: fixed and aligned to UTC, so a day's budget starts at 00:00 UTC, a month's
on the 1st, and a minute's rate at the minute."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from limits import RateLimitItem

__all__ = ["TokenWindow", "WindowKind", "token_windows"]

WindowKind = Literal["token_rate", "token_budget"]


@dataclass(frozen=True, slots=True)
class TokenWindow:
    """One token limit of a key: at most `limit` tokens used and reserved in each window."""

    kind: WindowKind
    item: RateLimitItem

    @property
    def limit(self) -> int:
        return self.item.amount

    @property
    def name(self) -> str:
        """The window whatever its limit (`token_budget:1-day`), so a raised limit keeps
        what the window has used."""
        return f"{self.kind}:{self.item.multiples}-{self.item.GRANULARITY.name}"

    def span(self, now: float) -> tuple[int, float, float]:
        """The index of the window that holds `now` (Unix seconds), its start and its end."""
        multiples, granularity = self.item.multiples, self.item.GRANULARITY
        if granularity.name in ("month", "year"):
            moment = datetime.fromtimestamp(now, UTC)
            per = 12 if granularity.name == "year" else 1
            months = (moment.year - 1970) * 12 + moment.month - 1
            index = months // (per * multiples)
            return index, _month(index * per * multiples), _month((index + 1) * per * multiples)
        length = multiples * granularity.seconds
        index = int(now // length)
        return index, float(index * length), float((index + 1) * length)


def _month(months: int) -> float:
    """The first moment of the month `months` after January 1970."""
    return datetime(1970 + months // 12, months % 12 + 1, 1, tzinfo=UTC).timestamp()


def token_windows(
    rates: list[RateLimitItem], budgets: list[RateLimitItem]
) -> tuple[TokenWindow, ...]:
    """A key's token windows; of two limits on one window the smaller holds."""
    windows: dict[str, TokenWindow] = {}
    for kind, items in (("token_rate", rates), ("token_budget", budgets)):
        for item in items:
            window = TokenWindow(kind, item)  # type: ignore[arg-type]
            if window.name not in windows or item.amount < windows[window.name].limit:
                windows[window.name] = window
    return tuple(windows.values())
