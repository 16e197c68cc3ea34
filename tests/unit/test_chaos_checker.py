"""The chaos checker on hand-made histories: each violation is caught, legal concurrency is
accepted.  (Its teeth against real broken builds are in tests/chaos/.)"""

from __future__ import annotations

import errno
from pathlib import Path

from tests.chaos.checker import Discard, Fence, check, divergence
from tests.chaos.history import HistoryWriter, Op, load
from tests.chaos.sectors import SECTOR, Kind, Stamp, decode, decode_run, encode, encode_run


def w(writer: int, seq: int, sector: int, n: int, t0: float, t1: float | None, **kw: object) -> Op:
    ok = kw.pop("ok", True if t1 is not None else None)
    return Op(writer, seq, "write", sector * SECTOR, n, t0, completed=t1, ok=ok, **kw)  # type: ignore[arg-type]


def r(writer: int, rid: int, sector: int, seen: list[object], t0: float, t1: float) -> Op:
    return Op(
        writer, rid, "read", sector * SECTOR, len(seen), t0, ok=True, completed=t1, sectors=seen
    )


def image(*runs: tuple[int, ...], size: int = 8) -> bytes:
    """Sectors 0..size-1, zeros but for (sector, n, writer, seq[, epoch]) runs (volume 0)."""
    buf = bytearray(size * SECTOR)
    for sector, n, writer, seq, *epoch in runs:
        run = encode_run(0, sector, n, writer, seq, epoch[0] if epoch else 0)
        buf[sector * SECTOR : (sector + n) * SECTOR] = run
    return bytes(buf)


def invariants(result: object) -> set[int]:
    return {v.invariant for v in result.violations}  # type: ignore[attr-defined]


def test_sectors_round_trip_and_classify() -> None:
    s = encode(Stamp(3, 42, 1, 9, 2))
    assert decode(s, 42).kind is Kind.VALID and decode(s, 42).stamp == Stamp(3, 42, 1, 9, 2)
    assert decode(s, 43).kind is Kind.MISDIRECTED
    assert decode(bytes(SECTOR), 0).kind is Kind.NEVER
    torn = encode_run(3, 42, 2, 1, 9, 2)[256 : 256 + SECTOR]
    assert decode(torn, 42).kind is Kind.CORRUPT
    flipped = bytearray(s)
    flipped[400] ^= 0x10
    assert decode(bytes(flipped), 42).kind is Kind.CORRUPT
    assert [d.kind for d in decode_run(encode_run(0, 5, 3, 1, 1, 0), 5)] == [Kind.VALID] * 3


def test_history_round_trip_and_unknown(tmp_path: Path) -> None:
    h = HistoryWriter(tmp_path / "h.jsonl", writer=4)
    a = h.invoke("write", 4096, 8, epoch=1)
    b = h.invoke("read", 0, 2)
    h.complete(a)
    h.invoke("write", 0, 1, epoch=1)  # never completed: the process "died"
    h.complete(b, sectors=[[4, a], 0])
    c = h.invoke("write", 0, 1, epoch=1)
    h.complete(c, errno=errno.EIO)
    h.close()
    with open(tmp_path / "h.jsonl", "a") as f:
        f.write('{"t":"invoke","id":9,"op":"wri')  # torn last line
    ops = {o.id: o for o in load([tmp_path / "h.jsonl"])}
    assert ops[a].ok and ops[a].first == 8 and ops[a].epoch == 1 and ops[a].writer == 4
    assert ops[2].sectors == [[4, a], 0]
    assert ops[3].ok is None and ops[3].completed is None
    assert ops[c].ok is False and ops[c].errno == errno.EIO
    assert 9 not in ops


def test_legal_history_with_concurrent_and_unknown_writes_is_accepted() -> None:
    ops = [
        w(1, 1, 0, 4, 0.0, 1.0),
        w(2, 1, 2, 4, 0.5, 1.5),  # overlaps 1:1 on sectors 2-3, concurrent with it
        w(1, 2, 0, 2, 2.0, None),  # unknown: may land any time after 2.0
        r(3, 1, 0, [[1, 1], [1, 1], [1, 1], [2, 1]], 1.6, 1.7),  # 1:1 or 2:1 on sector 2-3
        r(3, 2, 2, [[2, 1]], 0.7, 0.8),  # 2:1 concurrent with the read: fine
        r(3, 3, 0, [[1, 2], [1, 1]], 2.1, 2.2),  # unknown 1:2 landed on sector 0 only
    ]
    res = check(ops, image((0, 1, 1, 2), (1, 1, 1, 1), (2, 4, 2, 1)))
    assert res.ok, res.violations
    assert (res.ops_ok, res.ops_failed, res.ops_unknown) == (5, 0, 1)
    assert res.acked_writes_lost == 0


def test_lost_acknowledged_write_is_caught() -> None:
    ops = [w(1, 1, 0, 2, 0.0, 1.0), w(1, 2, 0, 2, 2.0, 3.0)]
    res = check(ops, image((0, 2, 1, 1)))  # the final volume still holds 1:1
    assert invariants(res) == {1} and res.acked_writes_lost == 1
    res = check(ops, image())  # never written at all
    assert invariants(res) == {1} and res.acked_writes_lost == 1


def test_stale_and_future_reads_are_caught() -> None:
    ops = [
        w(1, 1, 0, 1, 0.0, 1.0),
        w(1, 2, 0, 1, 2.0, 3.0),
        r(2, 1, 0, [[1, 1]], 4.0, 4.1),  # 1:2 acked before the read began: stale
        r(2, 2, 0, [[1, 2]], 1.1, 1.2),  # 1:2 invoked after this read completed: future
    ]
    res = check(ops, image((0, 1, 1, 2)))
    assert invariants(res) == {2} and res.stale_reads == 1 and res.future_reads == 1


def test_corrupt_misdirected_and_phantom_sectors_are_caught() -> None:
    ops = [
        w(1, 1, 0, 2, 0.0, 1.0),
        r(2, 1, 0, ["corrupt", ["misdirected", 1, 1]], 2.0, 2.1),
        r(2, 2, 0, [[7, 7]], 2.0, 2.1),  # a write nobody made
    ]
    img = bytearray(image((0, 2, 1, 1)))
    img[SECTOR : 2 * SECTOR] = encode(Stamp(0, 0, 1, 1, 0))  # sector 0's content in sector 1
    res = check(ops, bytes(img))
    assert 3 in invariants(res) and res.corrupt_returned == 4


def test_zeros_where_data_was_is_an_error_turned_into_data() -> None:
    ops = [w(1, 1, 0, 1, 0.0, 1.0), r(2, 1, 0, [0], 2.0, 2.1)]
    res = check(ops, image((0, 1, 1, 1)))
    assert invariants(res) == {6} and res.zeros_for_data == 1


def test_fences_bound_unknown_writes_and_rejected_writes_never_land() -> None:
    fence = Fence(at=5.0, epoch=2)
    ops = [
        w(1, 1, 0, 1, 0.0, None, epoch=1),  # unknown, epoch 1: cannot land after 5.0
        w(2, 1, 0, 1, 6.0, 7.0, epoch=2),  # acked after the fence
        w(1, 2, 1, 1, 4.0, 4.5, ok=False, errno=errno.ESTALE, epoch=1),
    ]
    # legal: the new write won
    res = check(ops, image((0, 1, 2, 1, 2)), fences=[fence])
    assert res.ok, res.violations
    assert res.fenced_rejected == 1 and res.fenced_applied == 0
    # the unknown epoch-1 write over the acked epoch-2 one: it landed after its fence
    res = check(ops, image((0, 1, 1, 1, 1)), fences=[fence])
    assert 4 in invariants(res) and res.fenced_applied == 1
    # without the fence it would have been legal (concurrent with everything after it)
    assert check(ops[:2], image((0, 1, 1, 1, 1))).ok
    # the rejected write seen on the volume
    res = check(ops, image((0, 1, 2, 1, 2), (1, 1, 1, 2, 1)), fences=[fence])
    assert invariants(res) == {4} and res.fenced_applied == 1


def test_replica_divergence_and_resync_bound(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(4096))
    b.write_bytes(bytes(4000) + b"x" * 96)
    assert divergence(a, b) == 96 and divergence(a, a) == 0
    res = check([], replicas=[a, b], resync_bytes=8192, dirty_bytes=4096)
    assert invariants(res) == {5} and res.divergence_bytes == 96 and len(res.violations) == 2
    assert check([], replicas=[a, a], resync_bytes=4096, dirty_bytes=4096).ok


def test_a_power_cut_of_both_may_take_only_what_no_flush_covered() -> None:
    """Writes 1 (flushed by 3 before the cut at t=10) and 2 (acked after 3 was sent): after
    a cut of every replica, sector 0 losing write 2 is legal, sector 1 losing write 1 is not."""
    flush = Op(1, 3, "flush", 0, 0, 4.0, completed=5.0, ok=True)
    ops = [w(1, 1, 1, 1, 1.0, 2.0), w(1, 2, 0, 1, 4.5, 6.0), flush]
    assert check(ops, image((1, 1, 1, 1)), power_cuts=[10.0]).ok  # write 2 gone: legal
    lost = check(ops, image(), power_cuts=[10.0])  # write 1 gone too: it was flushed
    assert invariants(lost) == {1} and lost.acked_writes_lost == 1
    assert lost.volatile_writes == 1
    # without a cut, losing write 2 is a violation as ever
    assert invariants(check(ops, image((1, 1, 1, 1)))) == {1}


def test_a_resolved_split_brain_discards_only_the_losing_side_while_apart() -> None:
    """Apart in (10, 20]: writer 1 (the losing side) acked write 2 there and read it back;
    writer 2 (the survivor's) acked write 1 to the same sector at t=12.  Resolved, the
    sector holds writer 2's write: legal.  Writer 1's write 1, acked before the split, must
    survive; and writer 2's losses are never excused."""
    ops = [
        w(1, 1, 1, 1, 1.0, 2.0),
        w(2, 1, 0, 1, 11.0, 12.0),
        w(1, 2, 0, 1, 13.0, 14.0),
        r(1, 3, 0, [[1, 2]], 15.0, 16.0),  # the losing side's own history
    ]
    apart = [Discard(frozenset({1}), 10.0, 20.0)]
    kept = check(ops, image((0, 1, 2, 1), (1, 1, 1, 1)), discards=apart)
    assert kept.ok and kept.discarded_writes == 1
    assert invariants(check(ops, image((0, 1, 2, 1)), discards=apart)) == {1}  # write 1:1 lost
    assert invariants(check(ops, image((1, 1, 1, 1)), discards=apart)) == {1}  # 2:1 lost
