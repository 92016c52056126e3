"""Providers are found by name: the built-ins, and plugins from the entry-point group."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from reasoning_agent.config import ConfigError, Settings
from reasoning_agent.llm import ENTRY_POINT_GROUP, load_provider, provider_names
from reasoning_agent.llm.agent import ReasoningAgent
from tests.support import ALICE

# Its subject is not the database: the PostgreSQL pass skips it.
pytestmark = pytest.mark.database_agnostic


def settings(**values: object) -> Settings:
    return Settings(api_keys=f"alice:{ALICE}", **values)  # type: ignore[arg-type]


def test_builtins_are_always_there() -> None:
    assert {"openai", "mock"} <= set(provider_names())
    assert load_provider(settings(llm_provider="mock")).name == "mock"


def test_an_unknown_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LLM_PROVIDER: unknown provider 'nope'"):
        load_provider(settings(llm_provider="nope"))


def test_an_installed_package_adds_a_provider_through_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "echo_plugin.py").write_text(
        textwrap.dedent(
            """
            from reasoning_agent.llm import LLMResult

            class Echo:
                name = "echo"
                default_model = "echo-1"
                def unconfigured_reason(self):
                    return None
                async def complete(self, request, *, deadline):
                    text = request.messages[-1]["content"]
                    return LLMResult(answer=text[::-1], model=request.model,
                                     prompt_tokens=1, completion_tokens=1, attempts=1)
                async def aclose(self):
                    return None

            def from_settings(settings):
                return Echo()
            """
        )
    )
    dist = tmp_path / "echo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\necho = echo_plugin:from_settings\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "echo" in provider_names()
        provider = load_provider(settings(llm_provider="echo"))
        import asyncio

        result = asyncio.run(ReasoningAgent(provider, timeout_s=5).run("abc"))
        assert (result.answer, result.model) == ("cba", "echo-1")
    finally:
        sys.modules.pop("echo_plugin", None)


def test_a_provider_that_ignores_the_deadline_is_cut_off() -> None:
    import asyncio

    from reasoning_agent.llm import DeadlineExceeded

    class Sleepy:
        name = "sleepy"
        default_model = "z"

        def unconfigured_reason(self) -> None:
            return None

        async def complete(self, request: object, *, deadline: float) -> None:
            await asyncio.sleep(30)

        async def aclose(self) -> None:
            return None

    agent = ReasoningAgent(Sleepy(), timeout_s=0.2)  # type: ignore[arg-type]
    with pytest.raises(DeadlineExceeded, match=r"no answer within 0\.2s"):
        asyncio.run(agent.run("hi"))
