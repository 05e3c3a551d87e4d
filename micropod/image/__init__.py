"""Images: references, the OCI layout store, load, and the built-in demo image."""
