"""The gRPC server: RuntimeService and ImageService on a Unix socket, each call in a fresh Context.

The handlers are built from the proto's own service descriptors, so every method the servicers implement is
served with the generated messages, and every other one (the streaming variants, checkpoints, metrics) is
UNIMPLEMENTED, as gRPC answers an unknown method. micropod's errors become status codes (micropod/cri/status.py);
anything else is logged with its traceback and answered UNKNOWN.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import text_format
from google.protobuf.message import Message

from micropod.context import Context
from micropod.cri.api import pb
from micropod.cri.network import CniOptions, PodNetworks
from micropod.cri.status import code_of
from micropod.errors import MicropodError, UsageError
from micropod.paths import StateRoot

log = logging.getLogger("micropod.cri")

DEFAULT_LISTEN = "unix:///run/micropod/cri.sock"
WORKERS = 16
MAX_MESSAGE = 16 << 20  # kubelet's own limit on CRI messages


class Servicer(Protocol):
    service: str  # the proto's service name


Handler = Callable[[Context, Any], Message]


def socket_path(listen: str) -> Path:
    if not listen.startswith("unix://"):
        raise UsageError(f"invalid --listen {listen!r}: micropod serves the CRI on a Unix socket (unix:///path)")
    path = Path(listen.removeprefix("unix://"))
    if not path.is_absolute():
        raise UsageError(f"invalid --listen {listen!r}: the socket path must be absolute")
    return path


def redacted(message: Message) -> Message:
    """A copy with every field the proto marks ``debug_redact`` (passwords, tokens) cleared, for the debug log."""
    copy = type(message)()
    copy.CopyFrom(message)
    _redact(copy)
    return copy


def _redact(message: Message) -> None:
    for field, value in message.ListFields():
        if field.GetOptions().debug_redact:
            message.ClearField(field.name)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in (value if field.is_repeated else [value]):
                _redact(item)


class CallRunner:
    """Runs one servicer method per call with its own Context, and turns what it raises into a status."""

    def __init__(self, root: StateRoot, debug: bool) -> None:
        self.root = root
        self.debug = debug

    def wrap(self, name: str, method: Handler) -> Callable[[Any, grpc.ServicerContext], Message]:
        def call(request: Any, context: grpc.ServicerContext) -> Message:
            started = time.monotonic()
            if self.debug:
                log.debug("%s %s", name, text_format.MessageToString(redacted(request), as_one_line=True)[:2000])
            ctx = Context(self.root, debug=self.debug)
            try:
                reply = method(ctx, request)
            except MicropodError as exc:
                log.info("%s failed: %s", name, exc)
                context.abort(code_of(exc), str(exc))
            except Exception as exc:
                log.exception("%s failed", name)
                context.abort(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
            finally:
                _close(ctx)
            if self.debug:
                log.debug("%s done in %.1f ms", name, (time.monotonic() - started) * 1000)
            return reply

        return call


def _close(ctx: Context) -> None:
    for store in ("state", "pods", "volumes"):
        if store in ctx.__dict__:
            with contextlib.suppress(Exception):
                ctx.__dict__[store].close()


def generic_handler(servicer: Servicer, runner: CallRunner) -> grpc.GenericRpcHandler:
    service = pb.DESCRIPTOR.services_by_name[servicer.service]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        implementation = getattr(servicer, method.name, None)
        if implementation is None or method.server_streaming or method.client_streaming:
            continue
        request_class = getattr(pb, method.input_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            runner.wrap(method.name, implementation),
            request_deserializer=request_class.FromString,
            response_serializer=lambda reply: reply.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def bind_unix(server: grpc.Server, path: Path) -> None:
    """The socket only root (its owner) can use; a stale one from a crashed server is replaced."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise UsageError(f"{path} is in use: another CRI server listens there")
        finally:
            probe.close()
    old = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix://{path}") == 0:
            raise UsageError(f"cannot listen on {path}")
    finally:
        os.umask(old)


def build_server(servicers: list[Servicer], runner: CallRunner) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cri"),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                  ("grpc.max_send_message_length", MAX_MESSAGE)])
    server.add_generic_rpc_handlers([generic_handler(s, runner) for s in servicers])
    return server


def serve_until_signalled(server: grpc.Server, path: Path, on_stop: Callable[[], None] | None = None) -> None:
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    server.start()
    log.info("serving the CRI on unix://%s", path)
    stopping.wait()
    server.stop(grace=5).wait()
    if on_stop is not None:
        on_stop()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def setup_logging(log_file: Path, debug: bool) -> None:
    """To the file and to stderr; --debug adds every call."""
    log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(os.fdopen(fd, "a", buffering=1)),
                                       logging.StreamHandler()]
    top = logging.getLogger("micropod")
    for handler in handlers:
        handler.setFormatter(formatter)
        top.addHandler(handler)
    top.setLevel(logging.DEBUG if debug else logging.INFO)
    top.propagate = False


def stream_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) >= 1 << 16:
        raise UsageError(f"invalid --stream-address {text!r}: use HOST:PORT (port 0 picks a free one)")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(root: StateRoot, listen: str, config: Path | None, network: str | None, debug: bool,
          streaming: str = "127.0.0.1:0", cni: CniOptions | None = None) -> None:
    from micropod.cri.containers import Containers
    from micropod.cri.images import Images
    from micropod.cri.runtime_info import RuntimeInfo, load_handlers
    from micropod.cri.sandboxes import Sandboxes
    from micropod.cri.stats import Stats
    from micropod.cri.streaming.server import StreamServer
    from micropod.cri.streaming_calls import Streaming

    path = socket_path(listen)
    handlers = load_handlers(config)
    root.ensure()
    try:
        streams = StreamServer(stream_address(streaming), root)
    except OSError as exc:
        raise UsageError(f"cannot listen for streams on {streaming}: {exc.strerror}") from None
    networks = PodNetworks(root, cni or CniOptions())
    servicers: list[Servicer] = [RuntimeInfo(handlers, networks), Sandboxes(handlers, networks, network),
                                 Containers(), Stats(), Streaming(streams), Images()]
    server = build_server(servicers, CallRunner(root, debug))
    bind_unix(server, path)
    streams.start()
    log.info("streaming on %s", streams.base_url)
    serve_until_signalled(server, path, on_stop=streams.shutdown)
