"""The mirror's leg rules (dst.mirror.legs): failfast drops, LAST_ERRED never drops."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dst.mirror.legs import LegState, LegTable, Verdict

IN, ERR, RES = LegState.IN_SYNC, LegState.ERRED, LegState.RESYNCING


def test_start_errs_dirty_or_unreachable_legs_and_refuses_to_serve_stale_data() -> None:
    assert LegTable.start([True, False]).states == [IN, ERR]
    assert LegTable.start([False, False, True]).states == [ERR, ERR, IN]
    with pytest.raises(ValueError, match="no leg is both reachable and in sync"):
        LegTable.start([False, False])
    with pytest.raises(ValueError):
        LegTable.start([])


def test_failfast_drops_a_leg_while_another_is_in_sync() -> None:
    table = LegTable.start([True, True])
    assert table.use_failfast(0) and table.use_failfast(1)
    assert table.on_error(1, failfast=True) is Verdict.DROP
    assert table.states == [IN, ERR]
    assert table.writable() == [0]


def test_last_good_leg_is_resubmitted_without_failfast_never_dropped() -> None:
    table = LegTable.start([True, True])
    table.on_error(0, failfast=True)
    assert not table.use_failfast(1), "failfast is off for the last good leg"
    assert table.on_error(1, failfast=True) is Verdict.RESUBMIT  # raced: sent with the flag
    assert table.on_error(1, failfast=False) is Verdict.KEEP
    assert table.states == [ERR, IN]


def test_failfast_returns_when_a_leg_is_back_in_sync() -> None:
    table = LegTable.start([True, True, True])
    table.on_error(2, failfast=True)
    table.on_error(1, failfast=True)
    assert not table.use_failfast(0)
    table.start_resync(1)
    assert table.use_failfast(1), "a resyncing leg is never the last good one"
    assert not table.use_failfast(0)
    assert table.writable() == [0, 1] and table.in_sync() == [0]
    assert table.finish_resync(1)
    assert table.use_failfast(0) and table.use_failfast(1)


def test_a_plain_error_drops_a_leg_that_is_no_longer_the_only_good_one() -> None:
    table = LegTable.start([True, False])
    assert not table.use_failfast(0)  # a request goes out without the flag ...
    table.start_resync(1)
    assert table.finish_resync(1)  # ... the other leg is back in sync meanwhile ...
    assert table.on_error(0, failfast=False) is Verdict.DROP  # ... so the failure drops it
    assert table.states == [ERR, IN]


def test_a_resyncing_leg_that_fails_is_erred_and_its_resync_does_not_finish() -> None:
    table = LegTable.start([True, False])
    table.start_resync(1)
    assert table.on_error(1, failfast=True) is Verdict.DROP
    assert not table.finish_resync(1)
    assert table.states == [IN, ERR]
    with pytest.raises(ValueError, match="leg 0 is in_sync"):
        table.start_resync(0)


def test_reads_rotate_over_in_sync_legs_only() -> None:
    table = LegTable.start([True, False, True])
    picks = {table.read_leg() for _ in range(6)}
    assert picks == {0, 2}


EVENTS = st.lists(
    st.tuples(st.sampled_from(["error", "plain_error", "resync", "finish"]), st.integers(0, 2)),
    max_size=60,
)


@given(EVENTS)
def test_no_sequence_of_events_leaves_no_leg_in_sync(events: list[tuple[str, int]]) -> None:
    table = LegTable.start([True, True, True])
    for event, leg in events:
        if event == "error":
            before = len(table.in_sync())
            verdict = table.on_error(leg, failfast=table.use_failfast(leg))
            if verdict is Verdict.RESUBMIT:
                assert before == 1 and table.states[leg] is IN
        elif event == "plain_error":
            if not table.use_failfast(leg):
                assert table.on_error(leg, failfast=False) is Verdict.KEEP
        elif event == "resync" and table.states[leg] is ERR:
            table.start_resync(leg)
        elif event == "finish":
            table.finish_resync(leg)
        assert table.in_sync(), f"no leg in sync after {event} on {leg}: {table.states}"
        assert table.use_failfast(leg) == (table.states[leg] is not IN or len(table.in_sync()) > 1)
