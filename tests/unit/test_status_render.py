"""``dst status`` tables: progress bars, several servers, unreachable ones (no network)."""

from __future__ import annotations

from typing import Any

from dst.admin import progress_bar, render_status, render_statuses


def doc(**resync: Any) -> dict[str, Any]:
    return {
        "node": "a",
        "role": "primary",
        "listen": "127.0.0.1:7410",
        "peer": "127.0.0.1:7411",
        "uptime_s": 5,
        "sessions": {"replica": 1},
        "volumes": {
            "vol0": {
                "size": 64 << 20,
                "connection": "connected",
                "disk": "up-to-date",
                "peer_disk": "outdated",
                "out_of_sync_bytes": 48 << 20,
                "resync": {"active": True, "rate_bytes_s": 10 << 20, **resync},
            }
        },
    }


def test_progress_bar() -> None:
    assert progress_bar(0, 100) == "[....................]   0%"
    assert progress_bar(45, 100) == "[#########...........]  45%"
    assert progress_bar(100, 100) == "[####################] 100%"
    assert progress_bar(5, 0) == "[####################] 100%"  # nothing to do is done
    assert progress_bar(7, 5).endswith("100%")


def test_resync_shows_a_bar_and_the_rate() -> None:
    table = render_status(doc(total_bytes=64 << 20, done_bytes=16 << 20))
    assert "[#####...............]  25% at 10.0 MiB/s" in table
    assert "48.0 MiB" in table and "outdated" in table


def test_several_servers_and_an_unreachable_one() -> None:
    text = render_statuses(
        ["127.0.0.1:7410", "127.0.0.1:7411"],
        [doc(total_bytes=1, done_bytes=1), "connection refused"],
    )
    assert text.startswith("== 127.0.0.1:7410 ==\nnode a  role primary")
    assert text.endswith("== 127.0.0.1:7411 ==\nunreachable: connection refused")
