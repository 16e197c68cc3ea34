"""The chaos suite: kill dst's processes mid-transaction and prove nothing was lost.

- ``sectors.py`` self-describing sectors; ``history.py`` per-process JSONL histories;
  ``checker.py`` the invariants of ../shared/TESTING.md over histories + final volume + replicas.
- ``workload.py`` a workload process (dst:// or nbd:// through ``nbdclient.py``).
- ``schedules.py`` seeded, bounded fault plans; ``runner.py`` carries one out on real
  ``dst serve`` / ``dst nbd`` processes and prints its figures.
- ``test_schedules.py`` the CI tier (fixed seeds, each schedule once, plus broken builds the
  checker must catch); ``test_store_faults.py`` the storage shim.

Run one schedule: ``python3 -m tests.chaos --schedule kill-primary-promote --seed 3
[--crash-point primary.after-peer-ack] [--broken NAME] [--keep]``; a soak:
``python3 -m tests.chaos --soak 30 [--seed S]`` (exit 1 on any violation).
"""
