"""Bounds on the numbers of seconds users give, shared by the command line and the rooms that
use them. No torch here: `nanoswarm --help` and option errors import this, and torch's import
costs ~2 s."""

MAX_SECONDS = 1e6  # any timeout: ZeroMQ's poll takes milliseconds as a C int (and 11 days is forever)
MIN_GOSSIP_INTERVAL = 0.05  # the shortest gossip round (--gossip-interval): 1e-9 s kept a node's loop busy
