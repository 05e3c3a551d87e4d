"""micropod: OCI containers in microVMs."""

__version__ = "0.1.0"
