# The one error type of the node program that a user can fix by changing how it is started.
# Must not live here: anything else; errors of the p2p layer stay in p2p.
from __future__ import annotations


class NodeError(Exception):
    """A bad argument, file or environment: reported as one line on stderr, exit code 2."""


class UsageError(NodeError):
    """The command line is wrong."""
