#!/usr/bin/env python3
"""A stand-in for the firecracker binary, strict about its API: every request is checked against the
official swagger (Firecracker v1.16.1) before it is obeyed.

    fake_firecracker.py --api-sock PATH --id ID

- Routing, methods, path parameters and body schemas come from the swagger file
  (<repo>/specs/firecracker-api-v1.16.1.yaml, vendored, or $FAKE_FC_SWAGGER).
- Object bodies reject unknown fields unless the schema says ``additionalProperties: true``: the
  swagger is silent, but Firecracker deserialises with serde ``deny_unknown_fields``.
- Which calls are allowed before/after InstanceStart is derived from the operations' summary and
  description text ("Pre-boot only", "Post-boot only", "will fail after machine startup");
  PHASE_RULES_NOT_IN_SPEC adds only what the spec text leaves unsaid, from Firecracker's
  rpc_interface.rs (handle_preboot_request / handle_request).
- Errors answer like Firecracker: 400 and ``{"fault_message": "..."}``.
- InstanceStart checks the kernel and drive files, writes a boot banner to stdout (the serial
  console) and starts the hybrid vsock: ``CONNECT <port>\\n`` on the vsock uds_path is answered
  ``OK <n>\\n`` and proxied to ``$FAKE_FC_GUEST_DIR/vsock_<port>.sock`` when that guest listener
  exists; otherwise the connection is closed, as Firecracker does when the guest port is not open.
- SendCtrlAltDel powers the "guest" off: the process exits 0.
- Every request, accepted or rejected, is appended to ``<api-sock>.requests.jsonl``.
- $FAKE_FC_ROOT emulates the jailer's chroot: the paths in requests and --api-sock are resolved
  under it. $FAKE_FC_CRASH makes the process print that text to stderr and exit 1 at once.

Stdlib + pyyaml + jsonschema. Tests run it through write_launcher(), which pins the interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import http.server
import itertools
import json
import os
import re
import shlex
import socket
import socketserver
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml


def write_output(fd: int, text: str) -> None:
    """A line for the log or metrics: dropped when the reader has fallen behind, as Firecracker does."""
    with contextlib.suppress(BlockingIOError):
        os.write(fd, text.encode())

SPEC_NAME = "firecracker-api-v1.16.1.yaml"
VERSION = "1.16.1"
HTTP_METHODS = ("get", "put", "patch", "post", "delete")

NOT_SUPPORTED_PRE_BOOT = "The requested operation is not supported before starting the microVM."
NOT_SUPPORTED_POST_BOOT = "The requested operation is not supported after starting the microVM."

PRE, POST = "pre-boot", "post-boot"
MMDS_SIZE_LIMIT = 51200


def default_swagger_path() -> Path:
    override = os.environ.get("FAKE_FC_SWAGGER")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "specs" / SPEC_NAME


def load_swagger(path: Path | None = None) -> dict[str, Any]:
    with (path or default_swagger_path()).open() as f:
        swagger: dict[str, Any] = yaml.safe_load(f)
    return swagger


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396, as Firecracker's PATCH /mmds applies it."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


# --- The pre-boot / post-boot table -------------------------------------------------------------

_PRE_BOOT_TEXT = re.compile(r"\bpre-boot only\b|\bwill fail after machine startup\b", re.IGNORECASE)
_POST_BOOT_TEXT = re.compile(r"\bpost-boot only\b", re.IGNORECASE)
_REQUIRED_STATE_TEXT = re.compile(r"should be in the `(\w+)` state", re.IGNORECASE)


def _operation_text(operation: dict[str, Any]) -> str:
    return f"{operation.get('summary', '')} {operation.get('description', '')}"


def phase_rules_from_spec(swagger: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(METHOD, path template) -> PRE or POST, for every operation whose text says so."""
    rules: dict[tuple[str, str], str] = {}
    for path, item in swagger["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            text = _operation_text(operation)
            pre, post = bool(_PRE_BOOT_TEXT.search(text)), bool(_POST_BOOT_TEXT.search(text))
            if pre and post:
                raise ValueError(f"{method.upper()} {path}: spec text says both pre- and post-boot only")
            if pre or post:
                rules[(method.upper(), path)] = PRE if pre else POST
    return rules


def required_states_from_spec(swagger: dict[str, Any]) -> dict[tuple[str, str], str]:
    """Operations whose description demands a VM state, e.g. snapshot/create needs `Paused`."""
    rules = {}
    for path, item in swagger["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                match = _REQUIRED_STATE_TEXT.search(_operation_text(operation))
                if match:
                    rules[(method.upper(), path)] = match.group(1)
    return rules


def once_only_from_spec(swagger: dict[str, Any]) -> set[tuple[str, str]]:
    """Operations whose documented 400 says the thing is "already initialized" (PUT /metrics)."""
    once = set()
    for path, item in swagger["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            bad_request = (operation.get("responses") or {}).get(400) or {}
            if "already initialized" in str(bad_request.get("description", "")):
                once.add((method.upper(), path))
    return once


# What the swagger text does not say but Firecracker enforces (src/vmm/src/rpc_interface.rs: the
# operations handle_preboot_request rejects with OperationNotSupportedPreBoot, and those
# handle_request rejects with OperationNotSupportedPostBoot). Only operations the spec text leaves
# open are listed; a test checks that none contradicts the spec.
PHASE_RULES_NOT_IN_SPEC: dict[tuple[str, str], str] = {
    ("PATCH", "/vm"): POST,  # Pause / Resume
    ("PUT", "/logger"): PRE,  # ConfigureLogger
    ("PUT", "/metrics"): PRE,  # ConfigureMetrics
    ("PUT", "/serial"): PRE,  # ConfigureSerial
    ("PUT", "/hotplug/memory"): PRE,  # SetMemoryHotplugDevice
    ("PATCH", "/hotplug/memory"): POST,  # UpdateMemoryHotplugSize
    ("GET", "/hotplug/memory"): POST,  # GetMemoryHotplugStatus
    ("GET", "/balloon/statistics"): POST,  # GetBalloonStats
    ("PATCH", "/balloon/statistics"): POST,  # UpdateBalloonStatistics
    ("PATCH", "/balloon/hinting/start"): POST,  # StartFreePageHinting
    ("GET", "/balloon/hinting/status"): POST,  # GetFreePageHintingStatus
    ("PATCH", "/balloon/hinting/stop"): POST,  # StopFreePageHinting
}

# PUT /actions is one operation in the swagger; its rules depend on action_type (same source).
ACTION_PHASES: dict[str, str] = {
    "InstanceStart": PRE,  # StartMicroVm; being pre-boot only is what makes it once-only
    "SendCtrlAltDel": POST,
    "FlushMetrics": POST,
}


def phase_table(swagger: dict[str, Any]) -> dict[tuple[str, str], str]:
    table = dict(PHASE_RULES_NOT_IN_SPEC)
    table.update(phase_rules_from_spec(swagger))
    return table


# --- Schemas ------------------------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Deny unknown fields on every object schema that does not allow them explicitly."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@dataclass
class Operation:
    method: str
    template: str
    pattern: re.Pattern[str]
    path_params: tuple[str, ...]
    body_required: bool
    body_validator: jsonschema.protocols.Validator | None
    body_properties: frozenset[str]


def _resolve(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = definitions[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def build_operations(swagger: dict[str, Any]) -> list[Operation]:
    definitions = _strict(copy.deepcopy(swagger.get("definitions", {})))
    operations = []
    for template, item in swagger["paths"].items():
        names = tuple(re.findall(r"{(\w+)}", template))
        regex = "^" + re.sub(r"{(\w+)}", r"(?P<\1>[^/]+)", template) + "$"
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            validator, required, properties = None, False, frozenset[str]()
            for param in operation.get("parameters", []):
                if param.get("in") == "body":
                    schema = _strict(param["schema"])
                    # Swagger 2.0 schemas are JSON Schema draft 4 (so 1.0 is not an integer).
                    validator = jsonschema.Draft4Validator({**schema, "definitions": definitions})
                    required = bool(param.get("required", False))
                    properties = frozenset(_resolve(schema, definitions).get("properties", {}))
            operations.append(Operation(
                method.upper(), template, re.compile(regex), names, required, validator, properties,
            ))
    return operations


# --- The instance -------------------------------------------------------------------------------


class Fault(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _serde_fault(detail: str) -> Fault:
    return Fault(f"An error occurred when deserializing the json body of a request: {detail}.")


@dataclass
class Instance:
    """The microVM's configuration and state, as far as the API can observe it."""

    instance_id: str
    root: Path | None
    state: str = "Not started"
    boot_source: dict[str, Any] | None = None
    machine: dict[str, Any] = field(default_factory=lambda: {"vcpu_count": 1, "mem_size_mib": 128, "smt": False})
    drives: dict[str, dict[str, Any]] = field(default_factory=dict)
    nets: dict[str, dict[str, Any]] = field(default_factory=dict)
    vsock: dict[str, Any] | None = None
    vsock_listener: socket.socket | None = None
    logger: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    log_fd: int | None = None
    metrics_fd: int | None = None
    entropy: dict[str, Any] | None = None
    mmds_config: dict[str, Any] | None = None
    mmds: Any = None
    done: set[tuple[str, str]] = field(default_factory=set)

    @property
    def started(self) -> bool:
        return self.state != "Not started"

    def host_path(self, path: str) -> Path:
        """A path as Firecracker would open it: inside the chroot when jailed."""
        if self.root is None:
            return Path(path)
        return self.root / path.lstrip("/")


class FakeFirecracker:
    def __init__(self, swagger: dict[str, Any], instance: Instance, record: Path,
                 guest_dir: Path | None) -> None:
        self.operations = build_operations(swagger)
        self.phases = phase_table(swagger)
        self.required_states = required_states_from_spec(swagger)
        self.once_only = once_only_from_spec(swagger)
        self.instance = instance
        self.record_path = record
        self.guest_dir = guest_dir
        self.lock = threading.Lock()
        self.shutdown_requested = threading.Event()
        self._host_ports = itertools.count(1 << 30)

    # Entry point for one HTTP request.

    def handle(self, method: str, raw_path: str, body_bytes: bytes) -> tuple[int, Any]:
        with self.lock:
            body: Any = None
            try:
                body = self._parse_body(method, body_bytes)
                status, answer = self._dispatch(method, raw_path, body)
            except Fault as fault:
                status, answer = fault.status, {"fault_message": fault.message}
            self._record(method, raw_path, body, body_bytes, status, answer)
            return status, answer

    def _record(self, method: str, path: str, body: Any, raw: bytes, status: int, answer: Any) -> None:
        if body is None and raw:
            body = raw.decode(errors="replace")  # unparsable: keep what was sent
        entry = {"method": method, "path": path, "body": body, "status": status, "accepted": status < 400}
        if status >= 400:
            entry["fault"] = answer.get("fault_message")
        with self.record_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    @staticmethod
    def _parse_body(method: str, raw: bytes) -> Any:
        if not raw.strip():
            return None
        if method == "GET":
            raise Fault("GET request cannot have a body.")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise _serde_fault(str(exc)) from exc

    def _route(self, method: str, path: str) -> tuple[Operation, dict[str, str]]:
        clean = path.split("?", 1)[0]
        if clean != "/":
            clean = clean.rstrip("/")
        for op in self.operations:
            match = op.pattern.match(clean)
            if match and op.method == method:
                return op, match.groupdict()
        raise Fault(f"Invalid request method and/or path: {method} {clean.lstrip('/')}.")

    def _dispatch(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        op, params = self._route(method, path)
        key = (op.method, op.template)
        self._validate_body(op, body)
        for name, value in params.items():
            if body is not None and name in op.body_properties and body.get(name) != value:
                raise Fault("The id from the path does not match the id from the body!")
        self._check_phase(self.phases.get(key))
        if key == ("PUT", "/actions"):
            self._check_phase(ACTION_PHASES[body["action_type"]])
        wanted_state = self.required_states.get(key)
        if wanted_state and self.instance.state != wanted_state:
            raise Fault(f"The microVM must be in the {wanted_state} state for this operation.")
        if key in self.once_only and key in self.instance.done:
            raise Fault("Reinitialization of metrics not allowed.")
        handler = getattr(self, f"_{op.method.lower()}_{_handler_name(op.template)}", None)
        if handler is None:
            raise Fault(f"The fake does not emulate {op.method} {op.template}.", status=501)
        answer = handler(body, **params)
        self.instance.done.add(key)
        return (204, None) if answer is None else (200, answer)

    @staticmethod
    def _validate_body(op: Operation, body: Any) -> None:
        if op.body_validator is None:
            if body is not None:
                raise _serde_fault(f"{op.method} {op.template} takes no body")
            return
        if body is None:
            if op.body_required:
                raise Fault(f"Empty {op.method} request.")
            return
        error = jsonschema.exceptions.best_match(op.body_validator.iter_errors(body))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "body"
            raise _serde_fault(f"{error.message} (at {where})")

    def _check_phase(self, phase: str | None) -> None:
        if phase == PRE and self.instance.started:
            raise Fault(NOT_SUPPORTED_POST_BOOT)
        if phase == POST and not self.instance.started:
            raise Fault(NOT_SUPPORTED_PRE_BOOT)

    def _must_exist(self, path: str, what: str) -> None:
        if not self.instance.host_path(path).exists():
            raise Fault(f"{what}: No such file or directory (os error 2): {path}")

    # Handlers: _<method>_<path with / and - as _>.

    def _get_(self, body: None) -> Any:
        return {"app_name": "Firecracker", "id": self.instance.instance_id,
                "state": self.instance.state, "vmm_version": VERSION}

    def _get_version(self, body: None) -> Any:
        return {"firecracker_version": VERSION}

    def _get_machine_config(self, body: None) -> Any:
        return dict(self.instance.machine)

    def _get_vm_config(self, body: None) -> Any:
        inst = self.instance
        config: dict[str, Any] = {
            "boot-source": inst.boot_source, "machine-config": inst.machine,
            "drives": list(inst.drives.values()), "network-interfaces": list(inst.nets.values()),
            "vsock": inst.vsock, "logger": inst.logger, "metrics": inst.metrics, "entropy": inst.entropy,
            "mmds-config": inst.mmds_config,
        }
        return {key: value for key, value in config.items() if value is not None}

    def _open_output(self, path: str, what: str) -> int:
        """As Firecracker's open_file_nonblock: a file or a named pipe, opened once and kept; a pipe with no
        reader is refused (ENXIO), and a full one drops what is written rather than blocking the VMM."""
        self._must_exist(path, what)
        try:
            return os.open(self.instance.host_path(path), os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise Fault(f"{what}: {exc.strerror} (os error {exc.errno}): {path}") from None

    def _put_logger(self, body: dict[str, Any]) -> None:
        if "log_path" in body:
            self.instance.log_fd = self._open_output(body["log_path"], "Logger error: Failed to open target file")
            write_output(self.instance.log_fd, f"[{self.instance.instance_id}:main] Running Firecracker v{VERSION}\n")
        self.instance.logger = body

    def _put_metrics(self, body: dict[str, Any]) -> None:
        self.instance.metrics_fd = self._open_output(body["metrics_path"], "Metrics error: Failed to open target file")
        self.instance.metrics = body

    def _put_boot_source(self, body: dict[str, Any]) -> None:
        self._must_exist(body["kernel_image_path"], "Boot source error: The kernel file cannot be opened")
        self.instance.boot_source = body

    def _put_machine_config(self, body: dict[str, Any] | None) -> None:
        config = {"smt": False, **(body or {})}
        vcpus = config.get("vcpu_count", 1)
        if config["smt"] and vcpus > 1 and vcpus % 2:
            raise Fault("Machine config error: The vCPU number is invalid! "
                        "The vCPU number can only be 1 or an even number when SMT is enabled.")
        if config.get("mem_size_mib", 128) == 0:
            raise Fault("Machine config error: The memory size (MiB) is invalid.")
        self.instance.machine = config

    def _put_drives(self, body: dict[str, Any], drive_id: str) -> None:
        others = [d for d in self.instance.drives.values() if d["drive_id"] != drive_id]
        if body["is_root_device"] and any(d["is_root_device"] for d in others):
            raise Fault("Drive config error: A root block device already exists!")
        if "path_on_host" in body:
            self._must_exist(body["path_on_host"], "Drive config error: Unable to open the block device backing file")
        self.instance.drives[drive_id] = body

    def _patch_drives(self, body: dict[str, Any], drive_id: str) -> None:
        if drive_id not in self.instance.drives:
            raise Fault("Drive config error: Invalid block device ID!")
        if "path_on_host" in body:
            self._must_exist(body["path_on_host"], "Drive config error: Unable to patch the block device")
        self.instance.drives[drive_id] = {**self.instance.drives[drive_id], **body}

    def _put_network_interfaces(self, body: dict[str, Any], iface_id: str) -> None:
        mac = body.get("guest_mac")
        if mac is not None and not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
            raise _serde_fault(f"invalid MAC address: {mac}")
        for other in self.instance.nets.values():
            if other["iface_id"] != iface_id and other["host_dev_name"] == body["host_dev_name"]:
                raise Fault(f"Network config error: The host device name {body['host_dev_name']} is already in use.")
        self.instance.nets[iface_id] = body

    def _patch_network_interfaces(self, body: dict[str, Any], iface_id: str) -> None:
        if iface_id not in self.instance.nets:
            raise Fault(f"Network config error: Invalid network interface ID: {iface_id}")

    def _put_vsock(self, body: dict[str, Any]) -> None:
        # Firecracker binds the host-side socket when the device is configured.
        if self.instance.vsock_listener is not None:
            self.instance.vsock_listener.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.instance.host_path(body["uds_path"])))
        except OSError as exc:
            listener.close()
            raise Fault(f"Vsock config error: Cannot create backend for vsock device: {exc}") from exc
        listener.listen(16)
        self.instance.vsock_listener = listener
        self.instance.vsock = body

    def _put_entropy(self, body: dict[str, Any]) -> None:
        self.instance.entropy = body

    def _put_mmds_config(self, body: dict[str, Any]) -> None:
        for iface in body["network_interfaces"]:
            if iface not in self.instance.nets:
                raise Fault(f"MMDS config error: The list of network interface IDs provided contains "
                            f"at least one ID that does not correspond to any existing network interface: {iface}")
        self.instance.mmds_config = body

    def _put_mmds(self, body: Any) -> None:
        self._check_mmds_size(body)
        self.instance.mmds = body

    @staticmethod
    def _check_mmds_size(body: Any) -> None:
        # Firecracker's --mmds-size-limit defaults to its HTTP payload limit, 51200 bytes
        if len(json.dumps(body)) > MMDS_SIZE_LIMIT:
            raise Fault("The MMDS patch request doesn't fit.", status=400)

    def _patch_mmds(self, body: Any) -> None:
        if self.instance.mmds is None:
            raise Fault("The MMDS data store is not initialized.", status=400)
        merged = merge_patch(self.instance.mmds, body)
        self._check_mmds_size(merged)
        self.instance.mmds = merged

    def _get_mmds(self, body: None) -> Any:
        if self.instance.mmds is None:
            raise Fault("The MMDS data store is not initialized.", status=404)
        return self.instance.mmds

    def _patch_vm(self, body: dict[str, Any]) -> None:
        self.instance.state = "Paused" if body["state"] == "Paused" else "Running"

    def _put_actions(self, body: dict[str, Any]) -> None:
        action = body["action_type"]
        if action == "InstanceStart":
            self._instance_start()
        elif action == "FlushMetrics":
            if self.instance.metrics is None:
                raise Fault("Internal Vmm error: Metrics error: The metrics system was not initialized.")
            assert self.instance.metrics_fd is not None
            write_output(self.instance.metrics_fd, json.dumps({"utc_timestamp_ms": 0, "api_server": {}}) + "\n")
        elif action == "SendCtrlAltDel":
            console(b"reboot: Power down\n")
            self.shutdown_requested.set()

    def _instance_start(self) -> None:
        inst = self.instance
        if inst.boot_source is None:
            raise Fault("Start microvm error: Cannot start microvm without kernel configuration.")
        self._must_exist(inst.boot_source["kernel_image_path"], "Start microvm error: Cannot load kernel")
        for drive in inst.drives.values():
            if "path_on_host" in drive:
                self._must_exist(drive["path_on_host"], "Start microvm error: Cannot open block device")
        inst.state = "Running"
        console(f"fake-firecracker {VERSION}: booting {inst.boot_source['kernel_image_path']} "
                f"with {inst.boot_source.get('boot_args', '')!r}\n".encode())
        if inst.vsock_listener is not None:
            threading.Thread(target=self._vsock_accept_loop, args=(inst.vsock_listener,), daemon=True).start()

    # Hybrid vsock.

    def _vsock_accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._vsock_connection, args=(conn,), daemon=True).start()

    def _vsock_connection(self, host: socket.socket) -> None:
        with host:
            host.settimeout(5)
            line = bytearray()
            try:
                while not line.endswith(b"\n") and len(line) < 32:
                    byte = host.recv(1)
                    if not byte:
                        return
                    line += byte
            except OSError:
                return
            match = re.fullmatch(rb"CONNECT (\d+)\n", bytes(line))
            if not match or self.guest_dir is None:
                return
            guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                guest.connect(str(self.guest_dir / f"vsock_{int(match.group(1))}.sock"))
            except OSError:
                guest.close()
                return  # nothing listens on that guest port: Firecracker resets the connection
            host.settimeout(None)
            host.sendall(f"OK {next(self._host_ports)}\n".encode())
            with guest:
                back = threading.Thread(target=_pump, args=(guest, host), daemon=True)
                back.start()
                _pump(host, guest)
                back.join()


def _handler_name(template: str) -> str:
    return re.sub(r"[/-]", "_", re.sub(r"/{\w+}", "", template)).strip("_")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)  # pass the EOF on, like a vsock half-close


def console(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


# --- HTTP over the API socket -------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: httpx reuses its connection
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, answer = self.server.fake.handle(self.command, self.path, body)
        payload = b"" if answer is None else json.dumps(answer).encode()
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()
        if self.server.fake.shutdown_requested.is_set():
            self.close_connection = True
            threading.Thread(target=self.server.shutdown, daemon=True).start()

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # stdout/stderr are the guest console; keep them clean


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, fake: FakeFirecracker) -> None:
        self.fake = fake
        super().__init__(path, _Handler)


def jailer_main(argv: list[str]) -> int:
    """Just enough of the jailer (docs/jailer.md) to check how micropod drives it, without root:
    validate the flags, create <chroot_base>/<exec_file_name>/<id>/root, and exec the exec-file
    with --id and the arguments after "--"; the "chroot" is emulated through FAKE_FC_ROOT."""
    parser = argparse.ArgumentParser(prog="jailer", allow_abbrev=False)
    parser.add_argument("--id", required=True)
    parser.add_argument("--exec-file", required=True)
    parser.add_argument("--uid", required=True, type=int)
    parser.add_argument("--gid", required=True, type=int)
    parser.add_argument("--chroot-base-dir", default="/srv/jailer")
    parser.add_argument("--netns")
    parser.add_argument("--cgroup-version", choices=["1", "2"])
    parser.add_argument("--daemonize", action="store_true")
    own, _, forwarded = _split_dashdash(argv)
    args = parser.parse_args(own)
    exec_file = Path(args.exec_file)
    if "firecracker" not in exec_file.name:
        print("Invalid exec file name: must contain 'firecracker'", file=sys.stderr)
        return 1
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
        print(f"Invalid instance ID: {args.id}", file=sys.stderr)
        return 1
    chroot = Path(args.chroot_base_dir) / exec_file.name / args.id / "root"
    chroot.mkdir(parents=True, exist_ok=True)
    os.environ["FAKE_FC_ROOT"] = str(chroot)
    os.environ.pop("FAKE_FC_AS_JAILER", None)
    argv_fc = [str(exec_file), "--id", args.id, "--start-time-us", "0", "--start-time-cpu-us", "0", *forwarded]
    os.execv(exec_file, argv_fc)


def _split_dashdash(argv: list[str]) -> tuple[list[str], str, list[str]]:
    if "--" not in argv:
        return argv, "", []
    i = argv.index("--")
    return argv[:i], "--", argv[i + 1:]


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("FAKE_FC_AS_JAILER"):
        return jailer_main(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="firecracker", allow_abbrev=False)
    parser.add_argument("--api-sock", default="/run/firecracker.socket")
    parser.add_argument("--id", default="anonymous-instance")
    # The jailer adds these when it execs firecracker.
    parser.add_argument("--start-time-us")
    parser.add_argument("--start-time-cpu-us")
    args = parser.parse_args(argv)  # unknown flags: exit 2, as Firecracker refuses them too

    crash = os.environ.get("FAKE_FC_CRASH")
    if crash:
        print(crash, file=sys.stderr, flush=True)
        return 1
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
        print(f"Invalid instance ID: {args.id}", file=sys.stderr)
        return 1

    root = Path(os.environ["FAKE_FC_ROOT"]) if os.environ.get("FAKE_FC_ROOT") else None
    instance = Instance(instance_id=args.id, root=root)
    api_sock = instance.host_path(args.api_sock)
    if api_sock.exists():
        print(f"Failed to open the API socket at: {args.api_sock}. Check that it is not already used.",
              file=sys.stderr)
        return 1
    guest_dir = os.environ.get("FAKE_FC_GUEST_DIR")
    fake = FakeFirecracker(load_swagger(), instance, Path(f"{api_sock}.requests.jsonl"),
                           Path(guest_dir) if guest_dir else None)
    with _Server(str(api_sock), fake) as server:
        server.serve_forever(poll_interval=0.05)
    return 0


def write_launcher(directory: Path, env: dict[str, str] | None = None, name: str = "firecracker") -> Path:
    """An executable that runs this fake with the current interpreter and ``env`` baked in.

    micropod passes its children a minimal environment, so settings for the fake travel in the
    launcher rather than in the caller's environment.
    """
    exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in (env or {}).items())
    launcher = directory / name
    launcher.write_text(
        f"#!/bin/sh\n{exports}exec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} \"$@\"\n"
    )
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return launcher


def read_requests(api_sock: Path) -> list[dict[str, Any]]:
    path = Path(f"{api_sock}.requests.jsonl")
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
