"""Identifier generation: UUIDv7 request ids and opaque claim ids."""

from __future__ import annotations

import secrets
import uuid

__all__ = ["new_claim_id", "uuid7"]


def uuid7(unix_seconds: float) -> str:
    """Return a UUIDv7 string (RFC 9562) for the given Unix time.

    The 48-bit millisecond timestamp makes ids roughly sortable by creation time; the remaining
    74 bits are random. FIFO order in the queue does not rely on this (the store keeps its own
    sequence), so no intra-millisecond monotonicity counter is needed.
    """
    millis = max(0, int(unix_seconds * 1000)) & ((1 << 48) - 1)
    rand = int.from_bytes(secrets.token_bytes(10), "big")
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)  # 62 bits
    value = (millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))


def new_claim_id() -> str:
    """Return a fresh, unguessable claim id (one per hand-out of a job)."""
    return "clm_" + secrets.token_urlsafe(16)
