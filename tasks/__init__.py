# tasknet tasks: the node side of task rounds (see docs/task-rounds.md).
# api.py: what a task author writes against; blobs.py: content ids; engine.py: the sans-IO
# round engine (what to do now); runner.py: running task code safely (trio);
# simulate.py: many nodes' engines against chain.rules, no I/O; builtin/: shipped tasks.
# Must not live here: chain rules (chain/), the store (kv/), the node process (tasknet_node/).
