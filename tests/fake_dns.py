"""A one-record DNS server for tests: every A query gets 192.0.2.99; it prints who asked.

Run as ``python tests/fake_dns.py ADDRESS``; it says "listening" once bound, then "query from IP" per query.
"""

from __future__ import annotations

import socket
import struct
import sys

ANSWER = "192.0.2.99"

s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("listening", flush=True)
while True:
    data, peer = s.recvfrom(512)
    print(f"query from {peer[0]}", flush=True)
    qid, = struct.unpack("!H", data[:2])
    end = 12
    while data[end]:
        end += data[end] + 1
    question = data[12:end + 5]
    qtype = struct.unpack("!H", data[end+1:end+3])[0]
    answers = b""
    if qtype == 1:
        answers = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ANSWER)
    s.sendto(struct.pack("!HHHHHH", qid, 0x8180, 1, 1 if answers else 0, 0, 0) + question + answers, peer)
