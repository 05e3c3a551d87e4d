"""The monitor socket's messages, byte for byte: a CLI of one version talks to the monitors that an older one
spawned, so api's builders must keep what was on the wire before they existed."""

from __future__ import annotations

import pytest

from micropod import wire
from micropod.monitor import api
from micropod.monitor.api import Op

WIRE: list[tuple[api.Message, bytes]] = [
    (api.started_message("c0ffee"), b'{"op":"started","id":"c0ffee"}'),
    (api.exit_message(0, None), b'{"op":"exit","code":0,"error":null}'),
    (api.exit_message(137, "killed", restarting=True),
     b'{"op":"exit","code":137,"error":"killed","restarting":true}'),
    (api.exec_started_message(2), b'{"op":"exec-started","sid":2}'),
    (api.exec_exit_message(3), b'{"op":"exec-exit","code":3}'),
    (api.exec_exit_message(126, ""), b'{"op":"exec-exit","code":126,"error":""}'),
    (api.stats_reply_message({"cpu_total": 5, "pids": 1}), b'{"op":"stats-reply","cpu_total":5,"pids":1}'),
    (api.stats_failure_message("not running"), b'{"op":"stats-reply","message":"not running"}'),
    (api.error_message("malformed request"), b'{"op":"error","message":"malformed request"}'),
    (api.request(Op.STOP, timeout=10.0, signal=15), b'{"op":"stop","timeout":10.0,"signal":15}'),
    (api.request(Op.CP_GET, path="/etc"), b'{"op":"cp-get","path":"/etc"}'),
    (api.request(Op.WAIT), b'{"op":"wait"}'),
]


@pytest.mark.parametrize(("message", "payload"), WIRE)
def test_the_bytes_on_the_socket_are_unchanged(message: api.Message, payload: bytes) -> None:
    assert wire.encode_control(message) == wire.HEADER.pack(wire.CONTROL, 0, len(payload)) + payload


def test_no_two_ops_share_a_value() -> None:
    values = [value for name, value in vars(Op).items() if name.isupper()]
    assert len(values) == len(set(values)) == 27
