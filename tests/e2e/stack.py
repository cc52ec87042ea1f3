"""The stack of processes the end-to-end tests run: Redis, Tansu, chat, gateways.

The launcher is roomcast/devstack.py (shared with `roomcast dev` and the
benchmarks); these are the names the tests, chaos.py and soak.py use. Unlike
`roomcast dev` (one port, SO_REUSEPORT), each gateway worker here gets its own
port, so a test knows which worker each client is on.
"""

from roomcast.devstack import DRAIN_WINDOW_S, Stack, start_chat, start_gateway, start_stack

__all__ = ["DRAIN_WINDOW_S", "Stack", "start_chat", "start_gateway", "start_stack"]
