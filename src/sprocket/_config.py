"""Settings: every tunable, read once from the CLI and the environment into one object.

Every variable of ours is prefixed ``SPROCKET_``; the platform's own (``TOGETHER_*``,
``TERMINATION_GRACE_PERIOD_SECONDS``, ``RUN_AND_EXIT``, ``WORLD_SIZE``) keep their names.
``docs/configuration.md`` lists each with its default.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ._errors import ConfigurationError

__all__ = ["Settings"]

T = TypeVar("T")

DEFAULT_API_BASE_URL = "https://api.together.ai"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the runtime needs to know, resolved before it starts."""

    name: str
    queue: bool = False
    host: str = "0.0.0.0"
    port: int = 8000
    #: Seconds from SIGTERM to the platform's SIGKILL; also bounds one predict.
    grace_period: float = 300.0
    #: ``RUN_AND_EXIT=N``: run the warmup inputs N times, print timings, exit.
    run_and_exit: int | None = None
    api_base_url: str = DEFAULT_API_BASE_URL
    api_key: str | None = None
    #: Lease asked for on each claim; heartbeats go out at least three times per lease.
    claim_timeout: float = 90.0
    #: How long the server may hold a claim request open (the ``timeout`` query value).
    poll_timeout: float = 5.0
    #: Part of the grace period kept for the final report when predict overruns a drain.
    report_reserve: float = 10.0
    requeue_on_shutdown: bool = False
    #: Minimum seconds between two info flushes (the heartbeat also carries info).
    info_flush_interval: float = 1.0
    max_download_bytes: int = 10 * 1024**3
    download_timeout: float = 600.0
    upload_concurrency: int = 4
    allow_link_local: bool = False
    work_dir: Path = dataclasses.field(default_factory=Path.cwd)
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    log_format: str = "text"
    log_level: str = "INFO"
    world_size: int = 1

    @property
    def prediction_timeout(self) -> float:
        """One predict may run for the grace period minus one second (protocol.md)."""
        return max(self.grace_period - 1.0, 0.0)

    @property
    def heartbeat_interval(self) -> float:
        """A third of the lease, so two lost heartbeats in a row still keep the claim."""
        return self.claim_timeout / 3.0

    @property
    def inputs_dir(self) -> Path:
        return self.work_dir / "inputs"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``env`` (default ``os.environ``); ``overrides`` win.

        Raises ``ConfigurationError`` naming the variable when a value cannot be parsed.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "api_base_url": env.get("TOGETHER_API_BASE_URL") or DEFAULT_API_BASE_URL,
            "api_key": env.get("TOGETHER_API_KEY") or None,
        }
        spec: list[tuple[str, str, Callable[[str], Any]]] = [
            ("grace_period", "TERMINATION_GRACE_PERIOD_SECONDS", _positive_float),
            ("run_and_exit", "RUN_AND_EXIT", _positive_int),
            ("world_size", "WORLD_SIZE", _positive_int),
            ("claim_timeout", "SPROCKET_CLAIM_TIMEOUT_SECONDS", _positive_float),
            ("poll_timeout", "SPROCKET_POLL_TIMEOUT_SECONDS", _positive_float),
            ("report_reserve", "SPROCKET_REPORT_RESERVE_SECONDS", _non_negative_float),
            ("requeue_on_shutdown", "SPROCKET_REQUEUE_ON_SHUTDOWN", _flag),
            ("info_flush_interval", "SPROCKET_INFO_FLUSH_SECONDS", _non_negative_float),
            ("max_download_bytes", "SPROCKET_MAX_DOWNLOAD_BYTES", _positive_int),
            ("download_timeout", "SPROCKET_DOWNLOAD_TIMEOUT_SECONDS", _positive_float),
            ("upload_concurrency", "SPROCKET_UPLOAD_CONCURRENCY", _positive_int),
            ("allow_link_local", "SPROCKET_ALLOW_LINK_LOCAL", _flag),
            ("work_dir", "SPROCKET_WORK_DIR", Path),
            ("backoff_initial", "SPROCKET_BACKOFF_INITIAL_SECONDS", _positive_float),
            ("backoff_max", "SPROCKET_BACKOFF_MAX_SECONDS", _positive_float),
            ("log_format", "SPROCKET_LOG_FORMAT", _choice("text", "json")),
            ("log_level", "SPROCKET_LOG_LEVEL", _choice(*_LOG_LEVELS)),
        ]
        for field, var, parse in spec:
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[field] = parse(raw.strip())
            except ValueError as exc:
                raise ConfigurationError(f"{var}={raw!r} is invalid: {exc}") from None
        values.update(overrides)
        return cls(**values)


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a positive number of seconds")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a number >= 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("expected a positive integer")
    return value


def _flag(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        for choice in choices:
            if raw.lower() == choice.lower():
                return choice
        raise ValueError(f"expected one of {', '.join(choices)}")

    return parse
