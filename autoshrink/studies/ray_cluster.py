"""The Ray cluster a search runs on: joined at ``--ray-address`` or started here."""

from __future__ import annotations

import os
import socket
from typing import Any

from autoshrink.errors import UsageError

__all__ = ["connect"]

# A joined cluster's nodes keep their own environment (their paths are their own): the driver
# passes on only the plugins it was told to refuse. A local cluster inherits the driver's.
_FORWARDED_ENV = ("AUTOSHRINK_BLOCK_PLUGINS",)


def connect(address: str | None, workers: int) -> None:
    """Join the cluster at ``--ray-address`` (``auto`` finds a running one), or start a local
    one sized by ``--workers``. Raises UsageError, in one line, when it cannot."""
    import ray

    if ray.is_initialized():
        return
    env = {key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ}
    env["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    options: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "runtime_env": {"env_vars": env},
        "configure_logging": False,
    }
    if address and address != "auto":
        _reachable(address)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=max(workers, os.cpu_count() or 1), **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local cluster"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"`--ray-address` {where}: cannot connect ({first}); start a cluster with "
            "`ray start --head`, or leave the option out to start a local one"
        ) from exc


def _reachable(address: str) -> None:
    """Fail fast on an address nothing listens at (Ray itself retries for minutes)."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"`--ray-address` {address}: nothing answers there ({exc}); start a cluster with "
            "`ray start --head`, or leave the option out to start a local one"
        ) from exc
