"""Policies, the caller's identity, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from icm import __version__
from icm.serve.auth import PERMISSIONS, Caller
from icm.serve.metrics import CONTENT_TYPE
from icm.serve.routes.common import ERRORS, can_read_metrics, is_admin, principal, service

router = APIRouter()


@router.get("/v1/policies", responses=ERRORS, tags=["policies"], summary="Policies and rule sets this server applies")
def policies(request: Request, _who: Caller = Depends(principal)) -> dict[str, Any]:
    svc = service(request)
    out = []
    for p in svc.policies.values():
        default_rules = svc.default_rules if p.name == svc.config_policy_name else p.rule_set().name
        labels = {rs.name: p.labels(rs) for rs in p.rule_sets}
        out.append({
            "name": p.name,
            "version": p.version,
            "description": p.description,
            "term": p.term.id,
            "question": p.term.question,
            "default_rules": default_rules,
            "attributes": [{"id": a.id, "question": a.question, "values": a.value_ids} for a in p.attributes],
            "rule_sets": [
                {"name": rs.name, "audience": rs.audience, "description": rs.description,
                 "thresholds": rs.thresholds.model_dump()}
                for rs in p.rule_sets
            ],
            "products": [
                {"id": pr.id, "description": pr.description, "assignment": pr.assignment, "positive": pr.positive,
                 "labels": {name: lab[pr.id].verdict for name, lab in labels.items()}}
                for pr in p.products
            ],
        })
    return {"default_policy": svc.config_policy_name, "default_rules": svc.default_rules, "policies": out}


@router.get("/v1/whoami", responses=ERRORS, tags=["operations"], summary="The caller's key name, role and permissions")
def whoami(request: Request, who: Caller = Depends(principal)) -> dict[str, Any]:
    """What this key is: its `name` (the identity recorded with its decisions and reviews; null
    without keys, when a reviewer says who they are), its `role` and what the role may do."""
    return {
        "name": who.name,
        "role": who.role,
        "permissions": sorted(PERMISSIONS[who.role]),
        "keys": service(request).auth.enabled,
    }


@router.get("/healthz", tags=["operations"], summary="Liveness")
def healthz(request: Request) -> JSONResponse:
    """``{"status": "ok"}`` (200) or ``{"status": "unavailable"}`` (503) for anyone (load balancers);
    the details (version, policy, backend, model, database, batching, auth) only for an admin caller."""
    svc = service(request)
    config = svc.config
    db_ok = svc.store.ping()
    running = svc.batcher is not None and svc.batcher.running
    status = "ok" if db_ok and running else "unavailable"
    body: dict[str, Any] = {"status": status}
    if is_admin(request):
        body.update({
            "version": __version__,
            "policy": svc.config_policy_name,
            "rules": svc.default_rules,
            "backend": svc.default_moderator.backend_name,
            "model": svc.default_moderator.model_id,
            "database": "ok" if db_ok else "unreachable",
            "batching": {
                "enabled": config.batching,
                "max_batch_size": config.max_batch_size if config.batching else 1,
                "max_wait_ms": config.max_wait_ms if config.batching else 0.0,
            },
            "auth": "api-keys" if svc.auth.enabled else "none (loopback only)" if not config.allow_unauthenticated else "none",
        })
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


@router.get("/metrics", response_class=PlainTextResponse, tags=["operations"], summary="Prometheus metrics")
def metrics(request: Request, _who: Caller = Depends(can_read_metrics)) -> PlainTextResponse:
    return PlainTextResponse(service(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get("/readyz", tags=["operations"], summary="Readiness")
def readyz(request: Request) -> JSONResponse:
    """``{"status": "ready"}`` (200) once the backend has judged a warm-up image at start (models
    loaded, one-off exports done), the database answers and the batch worker runs;
    ``{"status": "starting"}`` or ``{"status": "unavailable"}`` (503) otherwise. ``/healthz`` is liveness."""
    svc = service(request)
    running = svc.batcher is not None and svc.batcher.running
    if not svc.ready:
        status = "starting" if running else "unavailable"
    else:
        status = "ready" if running and svc.store.ping() else "unavailable"
    return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503,
                        headers=None if status == "ready" else {"Retry-After": "1"})
