# Configuration of the p2p layer: one plain dataclass, built by node.py or by an embedding app.
# Must not live here: parsing of command lines or files (node.py and testnets do that).
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .admission import AdmissionRule

DEFAULT_NETWORK = "tasknet-local"


@dataclass
class NetworkConfig:
    data_dir: Path
    network_id: str = DEFAULT_NETWORK
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    enable_mdns: bool = False
    # who may hold data and take part in membership (p2p/admission.py); open by default
    admission: AdmissionRule = field(default_factory=AdmissionRule)
    # membership and failure detection
    heartbeat_interval: float = 1.0
    # every node gossips a heartbeat, so the network's total heartbeat traffic grows with its
    # size; each node waits at least this long per alive member between heartbeats, which
    # keeps the total near 1 / heartbeat_per_member messages per second (py-libp2p spends
    # ~10 ms of CPU per node on each gossip message). Failure detection scales with it.
    heartbeat_per_member: float = 0.25
    suspect_after: float = 3.0
    dead_after: float = 8.0
    # discovery: how many direct connections a node keeps beyond the bootstrap peers
    target_connections: int = 6
    # under a closed admission rule: how many connections peers the rule does not admit may
    # hold at once (each costs them only a Noise handshake); a new one beyond it is closed.
    # Admitted peers are never counted; the open rule has no limit.
    max_stranger_connections: int = 32
    # ... and each of those connections is closed after this long (a slot is a lease: one
    # that died unnoticed, with no FIN or RST, frees its slot then)
    stranger_connection_max_s: float = 300.0
    # on stop, announce a permanent leave (data owners hand off) instead of a restartable stop
    leave_on_stop: bool = False
    max_redial_backoff: float = 30.0
    # every node signs its gossip with the libp2p pubsub signature (so js-libp2p and other
    # implementations accept it). Gossip without one comes from nodes of the previous release,
    # which do not sign: accepted while this is True, so a network upgrades node by node. The
    # next release turns it off (then only signed gossip is accepted); a bad signature is
    # refused either way.
    accept_unsigned_gossip: bool = True
    # limits
    max_gossip_size: int = 1024 * 1024
    max_frame_size: int = 4 * 1024 * 1024
    request_timeout: float = 10.0
    max_concurrent_requests_per_peer: int = 16
    subscriber_queue: int = 4096

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not self.network_id or "/" in self.network_id:
            raise ValueError(
                f"network id must be a non-empty name without '/': {self.network_id!r}"
            )
        if (isinstance(self.max_stranger_connections, bool)
                or not isinstance(self.max_stranger_connections, int)
                or self.max_stranger_connections < 0):
            raise ValueError("max_stranger_connections must be a whole number, 0 or more: "
                             f"{self.max_stranger_connections!r}")
        if (isinstance(self.stranger_connection_max_s, bool)
                or not isinstance(self.stranger_connection_max_s, int | float)
                or not self.stranger_connection_max_s > 0):
            raise ValueError("stranger_connection_max_s must be a number of seconds above 0: "
                             f"{self.stranger_connection_max_s!r}")
