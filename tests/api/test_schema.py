"""schemathesis against the live /openapi.json: no 5xx, and every answer as documented."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ALICE, Service

CHECKS = ",".join(
    [
        "not_a_server_error",
        "negative_data_rejection",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


def test_every_operation_answers_as_documented(shared_service: Service, tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is a dev dependency: make install"
    result = subprocess.run(
        [
            st,
            "run",
            f"{shared_service.base_url}/openapi.json",
            "--header",
            f"X-API-Key: {ALICE}",
            "--checks",
            CHECKS,
            "--max-examples",
            "40",
            "--seed",
            "20261126",
            "--request-timeout",
            "20",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    assert "API Operations:" in result.stdout and "Selected: 10/10" in result.stdout, summary
