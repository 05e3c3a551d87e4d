"""``python3.11 -I -S -m micropod.agent``: the guest agent (see main.py)."""

from micropod.agent.entry import main

main()
