"""Formatting helpers of the reports: numbers, intervals, Markdown tables, JSON-safe
values, PNG bytes and the self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def to_jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays unwrapped, NaN/inf as ``None``, tuples as
    lists, data frames as lists of records."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, pd.DataFrame):
        return to_jsonable(value.to_dict(orient="records"))
    if isinstance(value, list | tuple | np.ndarray):
        return [
            to_jsonable(v)
            for v in (value.tolist() if isinstance(value, np.ndarray) else value)
        ]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of a figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``n/a`` for missing/NaN, ints as is, floats rounded."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"


def fmt_ci(ci: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.812 [0.790, 0.833]`` from an ``{estimate, low, high}`` dict."""
    if not ci:
        return "n/a"
    est = fmt(ci.get("estimate"), digits)
    if ci.get("low") is None and ci.get("high") is None:
        return est
    return f"{est} [{fmt(ci.get('low'), digits)}, {fmt(ci.get('high'), digits)}]"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
code, pre { background: #f6f6f6; } pre { padding: 0.6em; overflow-x: auto; }
"""


def markdown_to_html(markdown_text: str, title: str = "Evaluation report") -> str:
    """A complete HTML page from the report Markdown (``markdown`` package, tables and
    fenced code)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_HTML_STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
