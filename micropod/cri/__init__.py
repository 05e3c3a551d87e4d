"""The Kubernetes CRI v1 server (`micropod cri serve`): a thin gRPC adapter over micropod's service layer.

A CRI pod sandbox is a micropod pod (one microVM); its containers are the pod's containers. What the CRI knows
beyond micropod's own records (metadata, annotations, log paths) lives beside them (micropod/cri/records.py),
so the CLI and the CRI see the same pods, and a restarted server finds everything again.
"""
