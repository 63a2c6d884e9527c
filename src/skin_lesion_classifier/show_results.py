"""Print the headline table of the last evaluation in the terminal.

``python -m skin_lesion_classifier.show_results [metrics.json] [--split test|val]`` reads the
evaluation metrics JSON (default ``data/08_reporting/evaluation_metrics.json``, its latest
version; name ``.../evaluation_metrics.json/<version>/evaluation_metrics.json`` for an
earlier one) written by the evaluation pipeline and prints, with rich, every headline figure with its lesion-bootstrap
interval and the decision rule that produced it (and, for a model that fuses patient
metadata, the same figure with the metadata withheld).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from skin_lesion_classifier.inference.versions import resolve_version
from skin_lesion_classifier.reporting.format import fmt
from skin_lesion_classifier.reporting.sections import headline_rows

DEFAULT_PATH = Path("data/08_reporting/evaluation_metrics.json")


def load_metrics(path: str | Path) -> dict:
    """The evaluation metrics dict; a clear ``FileNotFoundError`` / ``ValueError`` names
    the file when it is missing or not an evaluation metrics JSON."""
    path = resolve_version(path)  # a versioned output: its latest version
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no evaluation metrics yet; run `kedro run --pipelines "
            "evaluation,reporting` (or `kedro run`) first"
        )
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(metrics, dict) or "splits" not in metrics:
        raise ValueError(f"{path}: not an evaluation metrics file (no 'splits')")
    return metrics


def headline_table(metrics: dict, split: str = "test") -> Table:
    """A rich table of :func:`~skin_lesion_classifier.reporting.sections.headline_rows`."""
    if split not in metrics["splits"]:
        raise ValueError(
            f"no {split!r} split in the metrics; have {sorted(metrics['splits'])}"
        )
    rows = (
        metrics.get("headline")
        if split == "test" and metrics.get("headline")
        else (headline_rows(metrics, split))
    )
    level = metrics.get("bootstrap_settings", {}).get("level", 0.95)
    model = metrics.get("model", {})
    table = Table(
        title=f"{split} split: {model.get('arch', '?')} "
        f"({'x'.join(map(str, model.get('input_size', [])))}), "
        f"rule chosen on val: {metrics['decision_rule']['rule']}",
        caption=f"{level:.0%} intervals: bootstrap over lesions "
        f"({metrics.get('bootstrap_settings', {}).get('n_boot', '?')} replicates)",
    )
    table.add_column("metric")
    table.add_column("rule", style="cyan")
    table.add_column("estimate", justify="right", style="bold")
    table.add_column(f"{level:.0%} interval", justify="right")
    withheld = metrics.get("metadata_withheld")
    other = {}
    if withheld and split in withheld.get("splits", {}):
        # a model that fuses metadata: the same figures with every field unknown
        table.add_column("metadata withheld", justify="right")
        other = {(r["metric"], r["rule"]): r for r in headline_rows(withheld, split)}
    for r in rows:
        cells = [r["metric"], r["rule"], fmt(r.get("estimate")), _interval(r)]
        if withheld:
            w = other.get((r["metric"], r["rule"]))
            cells.append(f"{fmt(w.get('estimate'))} {_interval(w)}" if w else "")
        table.add_row(*cells)
    return table


def _interval(r: dict) -> str:
    if r.get("low") is None and r.get("high") is None:
        return ""
    return f"[{fmt(r.get('low'))}, {fmt(r.get('high'))}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "metrics",
        nargs="?",
        default=str(DEFAULT_PATH),
        help=f"evaluation metrics JSON (default {DEFAULT_PATH})",
    )
    parser.add_argument("--split", default="test", choices=("test", "val"))
    args = parser.parse_args(argv)
    console = Console()
    try:
        metrics = load_metrics(args.metrics)
        console.print(headline_table(metrics, args.split))
    except (FileNotFoundError, ValueError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
