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


def test_mirror_legs_render_with_state_and_progress() -> None:
    from dst.admin import render_mirror

    leg = {"resync_rate_bytes_s": 1 << 20, "resynced_bytes": 0, "errors": 0}
    doc = {
        "size": 64 << 20,
        "legs": [
            {**leg, "leg": "10.0.0.1:7410", "state": "in_sync", "reason": "", "dirty_bytes": 0,
             "resync_total_bytes": 0, "resync_done_bytes": 0},
            {**leg, "leg": "10.0.0.2:7410", "state": "resyncing", "reason": "failfast: timeout",
             "dirty_bytes": 4 << 20, "resync_total_bytes": 8 << 20, "resync_done_bytes": 4 << 20},
        ],
    }  # fmt: skip
    text = render_mirror({"vol0": doc})
    first, second = (line for line in text.splitlines() if "10.0.0." in line)
    assert "in_sync" in first and first.rstrip().endswith("-")
    assert "resyncing" in second and " 50%" in second and "4.0 MiB" in second
    assert "failfast: timeout" in second and text.startswith("mirror vol0  size 64.0 MiB")
