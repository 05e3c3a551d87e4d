"""One supervisor per VM, detached from the CLI (like conmon or a containerd shim).

It owns the VMM child and is the only client of the agent channel. It writes the container log
(docker json-file lines), records the exit status in the state store, and cleans up when the VM ends.
The CLI talks to it over its control socket, or over an inherited socket for `run`'s own attach.

The process (``python -m micropod.monitor``) is main: its arguments, umask and log. supervisor runs each boot's
event loop and the ending, launch starts the VM, restart applies the restart policy, clients keeps the
connections, requests answers them, sessions routes exec sessions and guest routes what the guest agent sends.
api names what travels on the control socket, and client is the CLI's end of it.

Nothing is imported here: the CLI imports client and api without the supervisor's dependencies.
"""
