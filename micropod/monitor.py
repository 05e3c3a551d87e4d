"""One supervisor per VM, detached from the CLI (like conmon or a containerd shim).

It owns the VMM child and is the only client of the agent channel. It writes the container log
(docker json-file lines), records the exit status in the state store, and cleans up when the VM ends.
The CLI talks to it over its control socket, or over an inherited socket for `run`'s own attach.

This module is the process: its arguments, umask and log. Its parts: monitor_loop runs each boot's event loop and
the ending, monitor_launch starts the VM, monitor_restart applies the restart policy, monitor_connections keeps the
clients, monitor_requests answers them, monitor_sessions routes exec sessions and monitor_guest routes what the
guest agent sends.

Run as ``python -m micropod.monitor --root ROOT VM_ID [--attach-fd N]``.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import socket
import sys
from pathlib import Path

from micropod.monitor_loop import Monitor
from micropod.paths import StateRoot

MONITOR_LOG_MAX = 4 << 20


def capped_log_handler(path: Path) -> logging.Handler:
    return logging.handlers.RotatingFileHandler(path, maxBytes=MONITOR_LOG_MAX, backupCount=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="micropod-monitor")
    parser.add_argument("--root", required=True)
    parser.add_argument("--attach-fd", type=int)
    parser.add_argument("--maintenance", action="store_true")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("vm_id")
    args = parser.parse_args(argv)
    # Everything the monitor and its VMM create (logs, sockets, snapshots' temporaries) is its owner's alone,
    # whatever umask the user who ran micropod had.
    os.umask(0o077)
    root = StateRoot.from_env(args.root)
    # A guest can make the monitor log (refused messages, its errors): the file is capped and rotated once,
    # so one VM's log never grows past MONITOR_LOG_MAX twice. Only a crash's traceback goes to stderr.
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        handlers=[capped_log_handler(root.vm(args.vm_id).monitor_log)],
                        format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    attach = socket.socket(fileno=args.attach_fd) if args.attach_fd is not None else None
    return Monitor(root, args.vm_id, attach, maintenance=args.maintenance).run()


if __name__ == "__main__":
    sys.exit(main())
