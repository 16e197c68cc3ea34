"""Test-wide settings.

Hypothesis: no per-example deadline — CI machines are shared and a slow example is not a
failure — and no too-slow health check, for the same reason.  Counterexamples print with the
blob needed to replay them.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "dst", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("dst")
