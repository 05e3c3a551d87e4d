"""Root filesystems: layers flattened into a squashfs base, and a sparse ext4 upper per VM."""
