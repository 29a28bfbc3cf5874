# The tasknet node program behind node.py: command line, control API, testnets, lifecycle.
# Must not live here: p2p protocol logic (p2p) or storage (crdt, shard). Import the modules
# directly (tasknet_node.runner, tasknet_node.api); this file stays empty so that the client
# commands start without importing libp2p.
