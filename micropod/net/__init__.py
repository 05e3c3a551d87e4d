"""VM networking: a bridge, a TAP per VM, IP leases, and one nftables ruleset built as data.

``lifecycle`` is the entry point: it plans a container's network at create, attaches it when the
monitor boots the VM, and detaches and releases it when the VM ends or is removed.
"""
