"""Providers by name: the built-in ones and those other packages declare as entry points.

A separate package adds a provider by declaring, in its own pyproject.toml::

    [project.entry-points."reasoning_agent.providers"]
    myllm = "my_package:from_settings"   # a callable (Settings) -> LLMProvider
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from reasoning_agent.config import ConfigError, Settings
from reasoning_agent.llm.base import LLMProvider, ProviderFactory

__all__ = ["ENTRY_POINT_GROUP", "load_provider", "provider_names"]

ENTRY_POINT_GROUP = "reasoning_agent.providers"
_BUILTIN = {
    "openai": "reasoning_agent.llm.openai:from_settings",
    "mock": "reasoning_agent.llm.mock:from_settings",
}


def _factories() -> dict[str, str | ProviderFactory]:
    found: dict[str, str | ProviderFactory] = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def provider_names() -> list[str]:
    return sorted(_factories())


def load_provider(settings: Settings) -> LLMProvider:
    """Build the provider named by LLM_PROVIDER, built in or installed as a plugin."""
    target = _factories().get(settings.llm_provider)
    if target is None:
        raise ConfigError(
            f"LLM_PROVIDER: unknown provider {settings.llm_provider!r}; "
            f"installed: {', '.join(provider_names())}"
        )
    factory = target if callable(target) else _resolve(target)
    return factory(settings)


def _resolve(spec: str) -> ProviderFactory:
    module, _, attr = spec.partition(":")
    factory: ProviderFactory = getattr(import_module(module), attr)
    return factory
