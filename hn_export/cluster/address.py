"""``--ray ADDRESS``: a cluster address as ``ray.init`` takes it (``HOST:PORT``, or ``auto`` for the cluster this
machine is attached to) or ``local`` (start a cluster on this machine for the run). Checked before any work; no
ray import."""

from __future__ import annotations

import dataclasses

from hn_export.errors import UserError

LOCAL, AUTO = "local", "auto"


@dataclasses.dataclass(frozen=True)
class ClusterAddress:
    text: str  # "local", "auto" or "HOST:PORT"

    @property
    def starts_cluster(self) -> bool:
        return self.text == LOCAL

    @property
    def init_address(self) -> str | None:
        """What ``ray.init(address=...)`` gets: None starts a cluster on this machine."""
        return None if self.starts_cluster else self.text


def parse_address(text: str) -> ClusterAddress:
    """``HOST:PORT``, ``auto`` or ``local``; anything else is a one-line `UserError`."""
    value = text.strip()
    if value.lower() in (LOCAL, AUTO):
        return ClusterAddress(value.lower())
    host, sep, port = value.rpartition(":")
    if sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536 and not any(c.isspace() for c in host):
        return ClusterAddress(f"{host}:{int(port)}")
    raise UserError(f"--ray {text!r} is not a cluster address",
                    "pass HOST:PORT (the head node's GCS address, as `ray start --head` prints it), auto (the "
                    "cluster this machine is attached to) or local (start one on this machine)")
