"""The streaming server that Exec, Attach and PortForward hand kubelet a URL of (as containerd's does):
SPDY/3.1 and WebSocket transports, the remotecommand protocols (channel.k8s.io v1 to v5) over them, and
portforward.k8s.io."""
