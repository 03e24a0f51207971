"""The exporter reads the workers' multiprocess files while they are being created."""

from __future__ import annotations

from pathlib import Path

from rango.metrics import Exporter


def test_a_file_being_created_is_left_for_the_next_scrape(tmp_path: Path) -> None:
    """prometheus-client creates a file empty, then sizes it; a scrape in between must not
    fail (it raised struct.error from /ready and /metrics)."""
    (tmp_path / "gauge_livemax_999999.db").write_bytes(b"")
    (tmp_path / "counter_999998.db").write_bytes(b"\0\0\0")
    exporter = Exporter(str(tmp_path))
    assert b"# HELP rango_hub_subscriptions_count" in exporter.render()
