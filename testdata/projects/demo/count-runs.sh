#!/bin/sh
# Appends this pipeline to the run log kept in the job's cache ($1) and
# says whether the cache came back from an earlier pipeline.
set -eu
log=$1 pipeline=$2
if [ -s "$log" ]; then
	echo "cache restored: $(wc -l < "$log") earlier pipeline(s): $(tr '\n' ' ' < "$log")"
else
	echo "no cache yet: the first pipeline writes it"
fi
mkdir -p "$(dirname "$log")"
echo "pipeline $pipeline" >> "$log"
