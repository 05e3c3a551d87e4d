"""``python3.11 -I -S -m micropod.agent``: the guest agent (see main.py)."""

from micropod.agent.main import main

main()
