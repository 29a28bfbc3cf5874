# tasknet's settlement layer: the pure rules every chain applies (rules.py), the round clock
# and role assignment (assignment.py) and Merkle distribution lists (merkle.py). The embedded
# ledger and the chain adapters live beside them and import these; nothing here does I/O.
from .assignment import (
    audit_assignment,
    audit_seed,
    auditor_order,
    auditors_of,
    distribution_order,
    distributor_of,
    round_of,
    targets_of,
    window_of,
)
from .rules import (
    REASONS,
    ChainState,
    Refused,
    TaskConfig,
    account_view,
    apply,
    genesis,
    round_view,
    task_view,
)

__all__ = [
    "REASONS",
    "ChainState",
    "Refused",
    "TaskConfig",
    "account_view",
    "apply",
    "audit_assignment",
    "audit_seed",
    "auditor_order",
    "auditors_of",
    "distribution_order",
    "distributor_of",
    "genesis",
    "round_of",
    "round_view",
    "targets_of",
    "task_view",
    "window_of",
]
