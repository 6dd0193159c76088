"""Markdown tables of the reports (benches, evaluation): one place that makes a header and its separator agree."""

from __future__ import annotations


def table_head(*columns: str) -> list[str]:
    """The header row of a Markdown table with ``columns`` and its separator row (one ``---`` per column)."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
