# Settlement on EVM chains: the TaskSettlement contract (TaskSettlement.sol, compiled by
# compile.js into TaskSettlement.json), a local anvil for tests and localnets (anvil.py), the
# node's EVM wallet key and its binding to the node's peer id (wallet.py), a synchronous
# JSON-RPC client for one contract (client.py) and the async chain adapter (adapter.py).
# Must not live here: imports of web3 or of the submodules. The ledger path imports `chain`
# without any EVM package installed, so nothing here may pull them in at import time.
