"""micropod-runtime: an OCI runtime (runtime-spec 1.2) with runc's command line; stdlib only, as it runs in guests."""
