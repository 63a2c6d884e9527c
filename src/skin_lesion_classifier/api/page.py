"""The upload page (``/`` and ``/static``) and the API docs (``/docs``).

``/docs`` is Swagger UI served from the files of the ``swagger-ui-bundle`` package, so it
works offline and under the page's Content-Security-Policy (no CDN, no inline script).
``SLC_DOCS=0`` turns ``/docs`` and ``/openapi.json`` off.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
DOCS_ASSETS = "/docs-assets"
DOCS_PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>skin-lesion-classifier API</title>
  <link rel="icon" href="data:,">
  <link rel="stylesheet" href="{DOCS_ASSETS}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{DOCS_ASSETS}/swagger-ui-bundle.js"></script>
  <script src="/static/docs.js"></script>
</body>
</html>
"""


def add_page(app: FastAPI) -> None:
    """``GET /`` (the upload page) and ``/static`` files."""

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def add_docs(app: FastAPI) -> None:
    """``GET /docs``: Swagger UI from local files (the ``swagger-ui-bundle`` package)."""
    from swagger_ui_bundle import swagger_ui_path

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_PAGE)

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")
