"""Fencing: volume epochs, so no write from a volume's previous owner lands late (seed 002)."""

from dst.fence.claims import CLAIMS, Ownership
from dst.fence.layer import FENCED_OPS, Fence, FenceStatistics

__all__ = ["CLAIMS", "FENCED_OPS", "Fence", "FenceStatistics", "Ownership"]
