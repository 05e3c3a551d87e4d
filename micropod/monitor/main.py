"""The monitor process: its arguments, umask and log (the package's docstring describes the whole).

Run as ``python -m micropod.monitor --root ROOT VM_ID [--attach-fd N]``, or ``--root ROOT --pod POD_ID``.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import socket
from pathlib import Path

from micropod.monitor.supervisor import Monitor
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
    parser.add_argument("--pod", action="store_true", help="the id is a pod's: run its VM and its containers")
    parser.add_argument("vm_id")
    args = parser.parse_args(argv)
    # Everything the monitor and its VMM create (logs, sockets, snapshots' temporaries) is its owner's alone,
    # whatever umask the user who ran micropod had.
    os.umask(0o077)
    root = StateRoot.from_env(args.root)
    # A guest can make the monitor log (refused messages, its errors): the file is capped and rotated once,
    # so one VM's log never grows past MONITOR_LOG_MAX twice. Only a crash's traceback goes to stderr.
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        handlers=[capped_log_handler((root.pod if args.pod else root.vm)(args.vm_id).monitor_log)],
                        format="%(asctime)s.%(msecs)03d %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.pod:
        from micropod.monitor.pod import PodMonitor

        return PodMonitor(root, args.vm_id).run()
    attach = socket.socket(fileno=args.attach_fd) if args.attach_fd is not None else None
    return Monitor(root, args.vm_id, attach, maintenance=args.maintenance).run()
