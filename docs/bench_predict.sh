#!/bin/bash
# Interleaved wall times of tumorseg-predict, before (BASE src) and after (NEW src):
# --help, one case, a folder of 4 cases. Usage: bench_predict.sh BASE_SRC NEW_SRC ROUNDS
BASE=$1; NEW=$2; ROUNDS=${3:-3}; PB=${PB:-/tmp/speed/pb}  # from docs/bench_checkpoint.py
CASE=$PB/cases/BraTS20_Training_001
t() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1 || echo "FAILED: $*" >&2; echo "$(date +%s.%N) - $s" | bc; }
for r in $(seq $ROUNDS); do
  for which in base new; do
    src=$BASE; [ $which = new ] && src=$NEW
    export PYTHONPATH=$src
    h=$(t python -m tumorseg.cli.predict --help)
    o=$(t python -m tumorseg.cli.predict --checkpoint $PB/default.ckpt --input $CASE --output /tmp/speed/out_$which.nii.gz --quiet)
    f=$(t python -m tumorseg.cli.predict --checkpoint $PB/default.ckpt --input $PB/cases --output /tmp/speed/outdir_$which --quiet)
    echo "round $r $which help $h one-case $o folder4 $f load $(cut -d' ' -f1 /proc/loadavg)"
  done
done
