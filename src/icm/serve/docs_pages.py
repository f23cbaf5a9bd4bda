"""``/docs`` (Swagger UI) and ``/redoc`` served without any CDN, and CORS for browser clients.

FastAPI's own pages load Swagger UI, ReDoc, a favicon and Google Fonts from the internet, so
they are blank on a machine without it. Here the pages name only this server: the scripts,
stylesheet and favicon come from the ``fastapi-offline`` wheel (``[serve]`` extra), mounted
at :data:`ASSETS_PATH`, and Swagger UI's online spec validator is switched off.
"""

from __future__ import annotations

from pathlib import Path

try:
    import fastapi_offline
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles
except ImportError as err:  # pragma: no cover
    raise ImportError(f"the server needs FastAPI and fastapi-offline ({err}): pip install 'icm-assistant[serve]'") from err

ASSETS_PATH = "/docs-assets"
"""Where Swagger UI's and ReDoc's files are served (swagger-ui-bundle.js, swagger-ui.css,
redoc.standalone.js, favicon.png)."""
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
RATE_LIMIT_HEADERS = ["Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"]


def install_docs(app: FastAPI) -> None:
    """Serve ``/docs``, its OAuth2 redirect page and ``/redoc`` from local assets.

    ``app`` must be made with ``docs_url=None, redoc_url=None``. URLs carry the ASGI
    ``root_path``, so the pages work behind a proxy that mounts the app under a prefix.
    """
    if not ASSETS_DIR.is_dir():  # pragma: no cover - a broken install
        raise ImportError(f"fastapi-offline has no static files in {ASSETS_DIR}: pip install 'icm-assistant[serve]' again")
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=app.title + " - Swagger UI",
            oauth2_redirect_url=root + redirect_url,
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            # the default sends the spec to validator.swagger.io for a badge
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=app.title + " - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )


def install_cors(app: FastAPI, origins: list[str]) -> None:
    """Let browser pages from ``origins`` call the API (none by default: no CORS headers at all).

    Requests authenticate with ``Authorization: Bearer KEY``, never cookies, so credentials
    stay off; the rate-limit headers are exposed so a page can back off. Add this middleware
    last: it must answer a preflight ``OPTIONS`` before authentication and the other middleware.
    """
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=RATE_LIMIT_HEADERS,
        allow_credentials=False,
        max_age=600,
    )
