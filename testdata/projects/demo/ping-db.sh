#!/bin/bash
# Sends the Redis protocol's PING to host $1 port $2 (bash's /dev/tcp, no
# client needed) and expects +PONG, retrying while the service starts.
set -u
host=$1 port=$2
for attempt in 1 2 3 4 5 6 7 8 9 10; do
	if exec 3<>"/dev/tcp/$host/$port" 2>/dev/null; then
		printf 'PING\r\n' >&3
		read -r -t 5 reply <&3 || reply=""
		exec 3<&-
		if [ "${reply%$'\r'}" = "+PONG" ]; then
			echo "service $host:$port answered +PONG (attempt $attempt)"
			exit 0
		fi
	fi
	sleep 1
done
echo "service $host:$port did not answer PING" >&2
exit 1
