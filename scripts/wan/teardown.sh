#!/bin/bash
# Removes what scripts/wan/setup.sh made.
D=${WAN_DIR:-/tmp/nanoswarm-wan}
[ -f "$D/router.pid" ] && kill "$(cat "$D/router.pid")" 2>/dev/null
for n in c a b d e rt; do ip netns del "nsw-$n" 2>/dev/null; done
true
