#!/bin/bash
# scripts/wan/shape.sh '{"delay_ms":50,"jitter_ms":10,"loss":0.01}': delay and jitter one way, per
# packet (a round trip is twice delay_ms); per host: {"hosts":{"10.77.0.2":{"loss":0.1,"down":true,
# "spike_every_s":5,"spike_ms":1000}}}. Read by the router within 0.1 s (scripts/wan/router.py).
D=${WAN_DIR:-/tmp/nanoswarm-wan}
echo "$1" > "$D/shape.json.tmp" && mv "$D/shape.json.tmp" "$D/shape.json"
