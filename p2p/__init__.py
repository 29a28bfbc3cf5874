# tasknet's p2p layer: an embeddable libp2p node (see network.Network) and its sans-IO parts.
from .config import NetworkConfig
from .envelope import Envelope, EnvelopeError
from .identity import Identity, IdentityError, load_or_create_identity
from .membership import Member, MemberEvent, MemberState
from .network import ConfigError, GossipMessage, Network, Subscription
from .rpc import HandlerError, PeerUnreachable, RemoteError, RequestError, RequestTimeout

__all__ = [
    "ConfigError", "Envelope", "EnvelopeError", "GossipMessage", "HandlerError", "Identity",
    "IdentityError", "Member", "MemberEvent", "MemberState", "Network", "NetworkConfig",
    "PeerUnreachable", "RemoteError", "RequestError", "RequestTimeout", "Subscription",
    "load_or_create_identity",
]
