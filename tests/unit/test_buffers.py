"""SpareBuffers (dst/block/buffers.py) and bench.profile's summary of py-spy stacks."""

from __future__ import annotations

from pathlib import Path

from bench.profile import summarize
from dst.block.buffers import SpareBuffers


def test_a_buffer_given_back_serves_the_next_request_of_its_length() -> None:
    spare = SpareBuffers(max_bytes=3 * 4096)
    a = spare.take(4096)
    a[:4] = b"used"
    spare.give_back(a)
    assert spare.held == 4096
    assert spare.take(8192) is not a  # another length: a fresh buffer
    b = spare.take(4096)
    assert b is a and spare.held == 0  # reused as it is, not zeroed (see the module)
    assert bytes(spare.take(4096)) == bytes(4096)  # none spare: a fresh, zeroed one


def test_spare_buffers_never_hold_more_than_their_cap() -> None:
    spare = SpareBuffers(max_bytes=2 * 4096)
    bufs = [spare.take(4096) for _ in range(3)]
    for buf in bufs:
        spare.give_back(buf)
    assert spare.held == 2 * 4096  # the third was dropped
    spare.give_back(bytearray(4096 * 4))
    assert spare.held == 2 * 4096


def test_profile_summary_separates_kernel_waits_from_python_work(tmp_path: Path) -> None:
    raw = tmp_path / "bridge.txt"
    raw.write_text(
        "run (trio/_core/_run.py:2532);get_events (trio/_core/_io_epoll.py:243) 50\n"
        "run (trio/_core/_run.py:2532);_submit (dst/nbd/bridge.py:336) 30\n"
        "run (trio/_core/_run.py:2533);_submit (dst/nbd/bridge.py:340) 10\n"
        "run (trio/_core/_run.py:2532);encode (dst/wire/codec.py:10) 10\n"
    )
    text = summarize(raw, top=5)
    assert "kernel waits/socket syscalls 50%, Python 50%" in text
    assert "80.0%  _submit (dst/nbd/bridge.py)" in text  # lines of one function together
    assert "20.0%  encode (dst/wire/codec.py)" in text
