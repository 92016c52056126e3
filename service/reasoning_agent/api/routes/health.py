"""Health and metrics: the kubelet's probes (no key), and the checks and metrics operators read."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from reasoning_agent.api.deps import ApiKeyDep, ServicesDep
from reasoning_agent.errors import Forbidden, error_responses
from reasoning_agent.observability import metrics
from reasoning_agent.storage.db import ping

__all__ = ["HealthOut", "probes", "router"]

router = APIRouter(responses=error_responses(400, 401, 414, 422, 503))
probes = APIRouter()  # for the kubelet: no key, no data


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "fail"]
    checks: dict[str, Any]


@router.get("/healthz", response_model=HealthOut, summary="Database, Redis and LLM checks")
async def healthz(_: ApiKeyDep, services: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await ping(services.database.engine)
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"fail: {exc.__class__.__name__}"
    redis_ok = await services.limiter.check_store()
    checks["redis"] = {None: "disabled", True: "ok", False: "fail"}[redis_ok]
    reason = services.agent.unconfigured_reason()
    checks["llm"] = (
        f"not configured: {reason}" if reason else f"ok ({services.agent.provider.name})"
    )
    if checks["database"] != "ok":
        status = "fail"
    elif redis_ok is False or reason:
        status = "degraded"
    else:
        status = "ok"
    return JSONResponse(
        {"status": status, "checks": checks}, status_code=503 if status == "fail" else 200
    )


@probes.get("/livez", summary="The process is alive (no key needed)")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/readyz", summary="The database answers (no key needed)")
async def readyz(services: ServicesDep) -> JSONResponse:
    try:
        async with asyncio.timeout(2):
            await ping(services.database.engine)
    except Exception:
        return JSONResponse({"status": "fail"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/metrics",
    summary="Prometheus metrics of every worker (keys named in ADMIN_KEYS)",
    response_class=Response,
    responses=error_responses(403),
)
async def prometheus_metrics(caller: ApiKeyDep, services: ServicesDep) -> Response:
    # Every tenant's key name and token counts are in there: an operator's view only.
    if caller.name not in services.settings.admin_names:
        raise Forbidden("/metrics is for the keys named in ADMIN_KEYS")
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)
