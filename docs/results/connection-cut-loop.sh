#!/bin/bash
cd "$(dirname "$0")/../.."
pass=0; fail=0
for i in $(seq 1 300); do
  if EOS_TEST_DSN=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python -m pytest -q -p no:cacheprovider tests/faults/test_connection_cuts.py -k "not random" > /tmp/cut_last.log 2>&1; then pass=$((pass+1)); else fail=$((fail+1)); cp /tmp/cut_last.log /tmp/cut_fail_$i.log; fi
  echo "iter $i pass $pass fail $fail load $(cut -d' ' -f1 /proc/loadavg)" >> "${LOG:-/tmp/cutloop.log}"
done
echo DONE >> "${LOG:-/tmp/cutloop.log}"
