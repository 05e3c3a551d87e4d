"""The guest agent (PID 1 inside the VM) and the framed protocol it speaks with the host.

Everything in this package runs inside the guest as well, so it uses the standard library only.
"""
