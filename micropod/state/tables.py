"""Every table of state.db, declared once, as the steps that build it (micropod/state/db.py applies them).

A change to a table is a new step at the end, never an edit of a shipped one: the step count is the
version that every existing database records.
"""

from __future__ import annotations

from micropod.state.db import AddColumn, Statement, Table

VMS = Table("vms", (
    Statement("""CREATE TABLE IF NOT EXISTS vms (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        image         TEXT NOT NULL,
        image_id      TEXT NOT NULL,
        command       TEXT NOT NULL,
        created       REAL NOT NULL,
        started       REAL,
        finished      REAL,
        status        TEXT NOT NULL,
        exit_code     INTEGER,
        error         TEXT,
        monitor_pid   INTEGER,
        monitor_start INTEGER,
        vmm_pid       INTEGER,
        vmm_start     INTEGER,
        auto_remove   INTEGER NOT NULL DEFAULT 0,
        backend       TEXT NOT NULL DEFAULT ''
    )"""),
    AddColumn("restart_count", "INTEGER NOT NULL DEFAULT 0"),
    # The pod (a row of ``pods``) whose VM runs the container; '' for a container in a VM of its own.
    AddColumn("pod", "TEXT NOT NULL DEFAULT ''"),
))

# IP leases: one address per VM id, so that concurrent runs never share one (micropod/net/ipam.py).
LEASES = Table("leases", (
    Statement("""CREATE TABLE IF NOT EXISTS leases (
        ip      TEXT PRIMARY KEY,
        vm_id   TEXT NOT NULL UNIQUE,
        subnet  TEXT NOT NULL,
        created REAL NOT NULL
    )"""),
))

# A VM's host networking: its TAP, address and ports, from which the root's rules are rebuilt
# (micropod/net/host.py).
ATTACHMENTS = Table("attachments", (
    Statement("""CREATE TABLE IF NOT EXISTS attachments (
        vm_id  TEXT PRIMARY KEY,
        tap    TEXT NOT NULL,
        mac    TEXT NOT NULL,
        ip     TEXT NOT NULL,
        ports  TEXT NOT NULL
    )"""),
    AddColumn("bridge", "TEXT NOT NULL DEFAULT ''"),
    AddColumn("subnet", "TEXT NOT NULL DEFAULT ''"),
    AddColumn("icc", "INTEGER NOT NULL DEFAULT 1"),
    # --network-rate on QEMU: what the guest may send, in bytes per second (0: no limit), as an nft limit
    AddColumn("rate", "INTEGER NOT NULL DEFAULT 0"),
    # the port of the VM's metadata server on the gateway, which its marked requests are DNATed to (0: none)
    AddColumn("metadata_port", "INTEGER NOT NULL DEFAULT 0"),
))

# Named volumes (micropod/volumes.py): each an ext4 image under <root>/volumes/<name>/. ``holder`` is the one
# VM it is attached to at a time; ``volume_users`` the containers that name it, running or not, which keep
# it from being removed, as docker's do.
VOLUMES = Table("volumes", (
    Statement("""CREATE TABLE IF NOT EXISTS volumes (
        name      TEXT PRIMARY KEY,
        created   REAL NOT NULL,
        size      INTEGER NOT NULL,
        labels    TEXT NOT NULL DEFAULT '{}',
        anonymous INTEGER NOT NULL DEFAULT 0,
        holder    TEXT
    )"""),
    Statement("""CREATE TABLE IF NOT EXISTS volume_users (
        volume TEXT NOT NULL,
        vm_id  TEXT NOT NULL,
        PRIMARY KEY (volume, vm_id)
    )"""),
))

# Pods (micropod/state/pods.py): one VM each, with its network and resources; containers name theirs in ``vms.pod``.
PODS = Table("pods", (
    Statement("""CREATE TABLE IF NOT EXISTS pods (
        id            TEXT PRIMARY KEY,
        name          TEXT NOT NULL UNIQUE,
        created       REAL NOT NULL,
        status        TEXT NOT NULL,
        started       REAL,
        finished      REAL,
        error         TEXT,
        labels        TEXT NOT NULL DEFAULT '{}',
        monitor_pid   INTEGER,
        monitor_start INTEGER,
        vmm_pid       INTEGER,
        vmm_start     INTEGER
    )"""),
))

ALL = (VMS, LEASES, ATTACHMENTS, VOLUMES, PODS)
