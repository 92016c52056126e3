"""API keys: parsing, fingerprints, and rotation of a mounted keys file without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from reasoning_agent.config import ConfigError
from reasoning_agent.keys import KeyRing, fingerprint, parse_keys
from tests.conftest import StartService
from tests.support import ALICE, BOB

# Its subject is not the database: the PostgreSQL pass skips it.
pytestmark = pytest.mark.database_agnostic

CAROL = "carol-key-0123456789abcdef"


def test_entries_may_be_named_or_not_and_split_by_commas_or_lines() -> None:
    keys = parse_keys(f"alice:{ALICE}, {BOB}\n# a comment\n\n{CAROL}", source="API_KEYS")
    names = {key.name for key in keys.values()}
    assert "alice" in names
    assert f"key-{fingerprint(BOB)[:12]}" in names and len(names) == 3
    assert keys[fingerprint(ALICE)].name == "alice"


def test_fingerprints_are_stable_keyed_and_not_the_key() -> None:
    assert fingerprint(ALICE) == fingerprint(ALICE) != fingerprint(BOB)
    assert len(fingerprint(ALICE)) == 64 and ALICE not in fingerprint(ALICE)
    import hashlib

    assert fingerprint(ALICE) != hashlib.sha256(ALICE.encode()).hexdigest()


@pytest.mark.parametrize(
    "text",
    ["tooshort", f"alice:{ALICE},alice:{BOB}", f"no spaces:{ALICE}", "x" * 600, ""],
)
def test_bad_key_lists_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="API_KEYS"):
        KeyRing(inline=text, file=None)


def test_authenticate_takes_only_known_keys() -> None:
    ring = KeyRing(inline=f"alice:{ALICE}", file=None)
    assert ring.authenticate(ALICE) is not None
    for wrong in (None, "", ALICE[:-1], ALICE + "x", ALICE.upper(), "x" * 100_000, "\x00"):
        assert ring.authenticate(wrong) is None


def test_a_rotated_keys_file_works_without_a_restart(
    start_service: StartService, tmp_path: Path
) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text(f"alice:{ALICE}\n")
    service = start_service(API_KEYS="", API_KEYS_FILE=str(keys), LLM_PROVIDER="mock")
    with service.client(ALICE) as alice, service.client(CAROL) as carol:
        task = alice.post("/task", json={"prompt": "before rotation"}).json()
        assert carol.get("/query").status_code == 401

        # Kubernetes swaps a Secret volume's files atomically: write beside, then rename.
        staged = tmp_path / "api-keys.new"
        staged.write_text(f"alice:{CAROL}\n")
        staged.replace(keys)
        deadline = time.monotonic() + 10
        while carol.get("/query").status_code != 200:
            assert time.monotonic() < deadline, "the rotated key was never accepted"
            time.sleep(0.2)
        assert alice.get("/query").status_code == 401
        # The name stayed `alice`, so the tasks stayed with it.
        assert [t["id"] for t in carol.get("/query").json()["items"]] == [task["id"]]

        keys.write_text("")  # an emptied file keeps the last good keys
        time.sleep(1.5)
        assert carol.get("/query").status_code == 200
    assert (
        "API_KEYS_FILE rejected, keeping the last good one: API_KEYS_FILE: holds no key"
        in service.logs()
    )


def test_a_name_given_in_both_sources_is_refused_at_start_and_on_a_re_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two keys of one name would be one tenant: the file's key would read the other's tasks."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"alice:{BOB}\n")
    with pytest.raises(ConfigError, match=r"'alice'.*API_KEYS and API_KEYS_FILE"):
        KeyRing(inline=f"alice:{ALICE}", file=keys_file)

    keys_file.write_text(f"bob:{BOB}\n")
    ring = KeyRing(inline=f"alice:{ALICE}", file=keys_file)
    keys_file.write_text(f"alice:{CAROL}\n")  # a rotation that reuses the env key's name
    time.sleep(1.1)  # past the re-read interval
    with caplog.at_level("WARNING", logger="reasoning_agent.keys"):
        assert ring.authenticate(CAROL) is None
    assert ring.authenticate(BOB) is not None  # the last good keys stay
    assert "API_KEYS and API_KEYS_FILE" in caplog.text
