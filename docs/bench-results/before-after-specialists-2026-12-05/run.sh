#!/usr/bin/env bash
# before (8738482, no specialists code) vs after (HEAD), default config, typing replay, alternating rounds
set -u
PY=/work/main/.venv/bin/python
OUT=/tmp/ba; rm -rf $OUT; mkdir -p $OUT
(cd /tmp && PYTHONPATH=/tmp/oldpkg exec $PY -c "import sys; from localcoder.cli import main; sys.exit(main(sys.argv[1:]))" serve --port 8811 > $OUT/old.log 2>&1) &
OLD=$!
(cd /tmp && exec $PY -c "import sys; from localcoder.cli import main; sys.exit(main(sys.argv[1:]))" serve --port 8812 > $OUT/new.log 2>&1) &
NEW=$!
for p in 8811 8812; do for i in $(seq 120); do curl -sf http://127.0.0.1:$p/health | grep -q '"ok"\|ready' && break; sleep 1; done; done
curl -s http://127.0.0.1:8811/health | head -c 300; echo; curl -s http://127.0.0.1:8812/health | head -c 300; echo
for r in 1 2 3; do
  if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  for v in $order; do
    port=$([ $v = old ] && echo 8811 || echo 8812)
    /work/main/.venv/bin/localcoder bench --url http://127.0.0.1:$port --workloads typing --no-peer --no-progress --out $OUT/$v-$r > $OUT/$v-$r.txt 2>&1
    echo "$v round $r done $(date +%T)"
  done
done
kill $OLD $NEW
