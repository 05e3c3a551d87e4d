"""VM networking: a bridge, a TAP per VM, IP leases, and one nftables ruleset built as data.

The pieces here are complete and tested in network namespaces; wiring them into `run` (TAP per VM,
guest addressing through the agent, `-p`) is issue 4's remaining work.
"""
