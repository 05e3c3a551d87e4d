"""A VM's network rate on QEMU, what the guest receives: a token bucket (tbf) as its TAP's root qdisc, since what
leaves the TAP goes to the guest. What it sends is held by an nft limit in the TAP's ingress chain (net/nft.py):
this kernel has no tc policer (act_police) nor ifb. Firecracker has rate limiters of its own instead.
"""

from __future__ import annotations

from micropod import proc

_LATENCY = "50ms"


def shaping_commands(tap: str, rate: int) -> list[list[str]]:
    """The tc commands that hold what ``tap`` delivers to ``rate`` bytes per second (0: no limit)."""
    if not rate:
        return [["tc", "qdisc", "del", "dev", tap, "root"]]
    burst = str(max(rate // 10, 16 * 1024))  # a tenth of a second's worth, at least 16 KiB
    return [["tc", "qdisc", "replace", "dev", tap, "root", "tbf", "rate", f"{rate * 8}bit", "burst", burst,
             "latency", _LATENCY]]


def shape(tap: str, rate: int) -> None:
    for argv in shaping_commands(tap, rate):
        proc.run(argv, check=bool(rate), timeout=10)  # removing a limit that was never set is no error
