"""The service layer: what a user can do with containers, volumes and the state root, as plain functions that
return data or raise micropod's errors. The CLI (micropod/cli/) is a thin adapter over it, and so will be
the CRI server: they see the same containers, volumes and images.

- ``containers``: create, start, stop, kill, remove, and waiting for a start;
- ``reconcile``: putting right what a crash or a kill left behind;
- ``housekeeping``: disk usage and prune.
"""
