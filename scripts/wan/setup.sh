#!/bin/bash
# Hosts in network namespaces joined by scripts/wan/router.py, a WAN emulator in user space (as
# root, Linux). Their addresses (10.77.0.0/24) exist only inside these namespaces:
#   nsw-c 10.77.0.10 (a client), nsw-a .1, nsw-b .2, nsw-d .3, nsw-e .4 (nodes).
# Then: scripts/wan/shape.sh '{"delay_ms":50,"jitter_ms":10,"loss":0.01}' and
# `ip netns exec nsw-a .venv/bin/nanoswarm node ... --listen tcp://10.77.0.1:7001`;
# scripts/wan/teardown.sh removes it all. State (the shape, the router's log) in $WAN_DIR.
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
D=${WAN_DIR:-/tmp/nanoswarm-wan}
mkdir -p "$D"
HOSTS="c=10.77.0.10 a=10.77.0.1 b=10.77.0.2 d=10.77.0.3 e=10.77.0.4"
ip netns add nsw-rt
ip -n nsw-rt link set lo up
echo '{}' > "$D/shape.json"
ARGS=""; for h in $HOSTS; do ARGS="$ARGS tw${h%%=*}=${h##*=}"; done
ip netns exec nsw-rt python3 -u "$HERE/router.py" "$D/shape.json" $ARGS > "$D/router.log" 2>&1 &
echo $! > "$D/router.pid"
for _ in $(seq 50); do grep -q ready "$D/router.log" && break; sleep 0.1; done
for h in $HOSTS; do
  n=${h%%=*}; ip=${h##*=}
  ip netns add "nsw-$n"
  ip -n "nsw-$n" link set lo up
  ip -n nsw-rt link set "tw$n" netns "nsw-$n"
  ip -n "nsw-$n" addr add "$ip/24" dev "tw$n"
  ip -n "nsw-$n" link set "tw$n" up
done
echo "hosts: nsw-c 10.77.0.10, nsw-a .1, nsw-b .2, nsw-d .3, nsw-e .4; shape: $D/shape.json"
