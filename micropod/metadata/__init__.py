"""The metadata service every bridged VM gets at 169.254.169.254, and the credentials it hands out: the tree
it serves (tree), its HTTP server on QEMU (server; Firecracker serves MMDS itself), the host's signing keys
(keyring), and the credentials' minting and checking (credential). vm ties them to one VM's monitor."""
