#!/bin/bash
# One network namespace whose loopback is a link of limited bandwidth (as root, Linux; the kernel
# needs sch_tbf, not sch_netem): a whole local swarm run inside it shares one pipe of RATE, every
# link of it (client and node-to-node) queued behind the others. For what bytes cost, where
# scripts/wan/ (setup.sh, router.py) is for what round trips and loss cost.
#   scripts/wan/bandwidth.sh up 20mbit     # namespace nsw-bw, 127.0.0.1 inside it only
#   ip netns exec nsw-bw .venv/bin/nanoswarm bench --stages 4 --sessions 1 --head-groups 0 --wires '' --links relay
#   scripts/wan/bandwidth.sh down
# lo's MTU is set to 1500: a token bucket drops every segment larger than its burst, and loopback
# segments are up to 64 KB (the first try here ended in disconnects).
set -e
NS=${BW_NETNS:-nsw-bw}
case "$1" in
  up)
    RATE=${2:?a rate, e.g. 20mbit}
    ip netns add "$NS"
    ip -n "$NS" link set lo mtu 1500 up
    ip netns exec "$NS" tc qdisc add dev lo root tbf rate "$RATE" burst 256kb latency 2000ms
    ip netns exec "$NS" tc qdisc show dev lo
    ;;
  down)
    ip netns del "$NS" 2>/dev/null || true
    ;;
  *)
    echo "usage: $0 up RATE | down" >&2
    exit 2
    ;;
esac
