"""micropod.runtime.caps: names and numbers, validation, and the apply steps against the real kernel, each in a
forked child that reports through a pipe (/proc/self/status, or the output of an exec'd cat)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from micropod import syscalls
from micropod.errors import OciRuntimeError, SpecError
from micropod.runtime import caps
from tests import forked

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changes capabilities and uids as root")

N = caps.NUMBERS


def in_child(body: Callable[[], Any], timeout: float = 30.0) -> tuple[int, bytes]:
    """``body`` in a forked child with its stdout on the pipe (it may exec); its wait status and output."""
    return forked.in_child(body, timeout, on_stdout=True)


def reply_of(body: Callable[[], Any]) -> dict[str, Any]:
    status, data = in_child(body)
    assert os.waitstatus_to_exitcode(status) == 0, data
    reply: dict[str, Any] = json.loads(data)
    return reply


def masks(status_text: str) -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd and CapAmb from a /proc/PID/status text."""
    return {key: int(value, 16) for key, _, value in
            (line.partition(":\t") for line in status_text.splitlines()) if key.startswith("Cap")}


def own_masks() -> dict[str, int]:
    return masks(Path("/proc/self/status").read_text())


def all_but(*names: str) -> frozenset[int]:
    """What this process holds (a sandbox may already lack some), minus ``names``."""
    held = own_masks()["CapPrm"] & own_masks()["CapBnd"]
    return frozenset(N[name] for name in caps.names(held) if name not in names)


def test_names_and_numbers() -> None:
    assert N["CAP_CHOWN"] == 0 and N["CAP_SYS_ADMIN"] == 21 and N["CAP_CHECKPOINT_RESTORE"] == 40
    assert len(caps.ALL_CAPS) == 41 and caps.ALL_CAPS[13] == "CAP_NET_RAW"
    assert len(set(caps.DOCKER_DEFAULT_CAPS)) == 14 and set(caps.DOCKER_DEFAULT_CAPS) <= set(caps.ALL_CAPS)
    assert caps.last_cap() == int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    assert caps.available() == caps.ALL_CAPS[: caps.last_cap() + 1]
    bits = caps.mask([N["CAP_KILL"], N["CAP_BPF"]])
    assert bits == 1 << 5 | 1 << 39 and caps.names(bits) == ["CAP_KILL", "CAP_BPF"]


def test_parse() -> None:
    parsed = caps.parse({"bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_KILL"], "effective": ["CAP_KILL"],
                         "ambient": []})
    assert parsed == caps.CapabilitySets(bounding=frozenset({0, 5}), effective=frozenset({5}))
    assert caps.parse(None) == caps.parse({}) == caps.CapabilitySets()  # runc: none at all


def test_unknown_names_are_ignored_and_reported_as_runc_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = caps.parse({"bounding": ["CAP_FOO", "CAP_KILL", "cap_chown"], "permitted": ["CAP_FOO", "CAP_BPF"]})
    assert parsed.bounding == {N["CAP_KILL"]} and parsed.permitted == {N["CAP_BPF"]}
    assert parsed.ignored == ("CAP_FOO", "cap_chown")
    monkeypatch.setattr(caps, "last_cap", lambda: 37)  # a kernel before CAP_PERFMON
    older = caps.parse({"bounding": ["CAP_AUDIT_READ", "CAP_PERFMON", "CAP_CHECKPOINT_RESTORE"]})
    assert older.bounding == {37} and older.ignored == ("CAP_PERFMON", "CAP_CHECKPOINT_RESTORE")


@pytest.mark.parametrize(("config", "field"), [
    (["CAP_KILL"], "process.capabilities"),
    ({"bounding": "CAP_KILL"}, "process.capabilities.bounding"),
    ({"effective": ["CAP_KILL", 5]}, "process.capabilities.effective[1]"),
    ({"ambient": [None]}, "process.capabilities.ambient[0]"),
])
def test_validation_names_the_field(config: Any, field: str) -> None:
    with pytest.raises(SpecError) as caught:
        caps.validate(config)
    assert caught.value.field == field and str(caught.value).startswith(field + ": ")


@pytest.mark.parametrize("drop_chown", [True, False])
def test_without_cap_chown_chown_to_another_uid_fails(tmp_path: Path, drop_chown: bool) -> None:
    target = tmp_path / "file"
    target.write_text("")
    keep = all_but("CAP_CHOWN") if drop_chown else all_but()
    sets = caps.CapabilitySets(bounding=keep, effective=keep, permitted=keep)

    def body() -> Any:
        caps.drop_bounding(sets.bounding)
        caps.apply(sets)
        try:
            os.chown(target, 4242, 4242)
            chown = 0
        except OSError as exc:
            chown = exc.errno or 0
        return chown, own_masks()

    reply = reply_of(body)["result"]
    assert reply[0] == (errno.EPERM if drop_chown else 0)
    assert (target.stat().st_uid == 4242) is not drop_chown
    assert reply[1] == {"CapInh": 0, "CapPrm": caps.mask(keep), "CapEff": caps.mask(keep),
                        "CapBnd": caps.mask(keep), "CapAmb": 0}


@pytest.mark.parametrize("ambient", [True, False])
def test_ambient_capabilities_survive_exec_as_another_user(ambient: bool) -> None:
    granted = frozenset({N["CAP_NET_RAW"], N["CAP_NET_BIND_SERVICE"]})
    bounding = granted | {N["CAP_KILL"]}
    sets = caps.CapabilitySets(bounding=bounding, effective=granted, permitted=granted, inheritable=granted,
                               ambient=granted if ambient else frozenset())

    def body() -> Any:
        caps.drop_bounding(sets.bounding)
        caps.keep_caps_across_setuid()
        os.setgroups([])
        os.setresgid(1000, 1000, 1000)
        os.setresuid(1000, 1000, 1000)
        caps.apply(sets)
        os.execv("/bin/cat", ["cat", "/proc/self/status"])

    status, output = in_child(body)
    assert os.waitstatus_to_exitcode(status) == 0, output
    text = output.decode()
    assert "Uid:\t1000\t1000\t1000\t1000" in text
    carried = caps.mask(granted) if ambient else 0
    assert masks(text) == {"CapInh": caps.mask(granted), "CapPrm": carried, "CapEff": carried,
                           "CapBnd": caps.mask(bounding), "CapAmb": carried}


def test_an_ambient_capability_that_cannot_be_raised_is_skipped_as_runc_does() -> None:
    net_raw = frozenset({N["CAP_NET_RAW"]})
    sets = caps.CapabilitySets(bounding=net_raw, effective=net_raw, permitted=net_raw, ambient=net_raw)

    def body() -> Any:
        caps.drop_bounding(sets.bounding)
        caps.apply(sets)
        return own_masks()["CapAmb"], own_masks()["CapEff"]

    assert reply_of(body) == {"result": [0, caps.mask(net_raw)]}


def test_an_effective_capability_that_is_not_permitted_is_an_error() -> None:
    sets = caps.CapabilitySets(effective=frozenset({N["CAP_KILL"]}), permitted=frozenset({N["CAP_CHOWN"]}))
    reply = reply_of(lambda: caps.apply(sets))
    assert reply["error"].startswith("OciRuntimeError: unable to apply caps: capset")
    assert reply["error"].endswith("Operation not permitted")


def test_drop_bounding_without_cap_setpcap_fails_instead_of_keeping_more() -> None:
    keep = all_but("CAP_SYS_MODULE")

    def body() -> Any:
        effective, permitted, inheritable = syscalls.capget()
        syscalls.capset(effective & ~(1 << N["CAP_SETPCAP"]), permitted, inheritable)
        caps.drop_bounding(all_but())  # nothing to drop: fine without CAP_SETPCAP
        try:
            caps.drop_bounding(keep)
        except OciRuntimeError as exc:
            return str(exc), own_masks()["CapBnd"] == caps.mask(all_but())
        return None

    assert reply_of(body)["result"] == ["unable to apply bounding set: prctl PR_CAPBSET_DROP 16: "
                                        "Operation not permitted", True]


def test_syscalls_capget_matches_proc() -> None:
    effective, permitted, inheritable = syscalls.capget()
    own = own_masks()
    assert (effective, permitted, inheritable) == (own["CapEff"], own["CapPrm"], own["CapInh"])
