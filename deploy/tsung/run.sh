#!/usr/bin/env bash
# Run a tsung 1.7 scenario (connect.xml: connect and stay; messages.xml: connect and
# talk) against a greenchat server, from loopback source addresses, for a bounded time.
#
#   deploy/tsung/run.sh [-u USERS] [-d SECONDS] [-H HOST] [-P PORT] [-r PER_S]
#                       [-s connect|messages] [-i SECONDS] [-l LOGDIR]
#
# -u users to start (default 1000); -d seconds the load lasts, after which tsung ends
# every session (default 60); -H/-P the server (default 127.0.0.1:8080); -r new users per
# second (default 1000); -s the scenario; -i seconds between one user's messages in the
# messages scenario (default 30); -l where this run's logs go (default: a new
# ./tsung-logs/run-TIME-PID: tsung names its folder by the minute, so two runs in one
# minute would otherwise share it).
#
# Source addresses: one address has at most ip_local_port_range's ports to one server,
# so users are spread over 127.0.0.2, 127.0.0.3, ... (bindable without `ip addr add`),
# one per ~90% of the port range. One tsung VM holds at most the open-files limit's
# sockets. tsung leaves `epmd -daemon` running: this script stops the one it started.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
users=1000 duration=60 host=127.0.0.1 port=8080 rate=1000 scenario=connect interval=30
logdir=""
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while getopts "u:d:H:P:r:s:i:l:h" option; do
    case "$option" in
        u) users=$OPTARG ;; d) duration=$OPTARG ;; H) host=$OPTARG ;; P) port=$OPTARG ;;
        r) rate=$OPTARG ;; s) scenario=$OPTARG ;; i) interval=$OPTARG ;; l) logdir=$OPTARG ;;
        *) usage ;;
    esac
done
for number in "$users" "$duration" "$port" "$rate" "$interval"; do
    [[ "$number" =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: not a positive integer: $number" >&2; exit 2; }
done
case "$scenario" in connect|messages) ;; *) echo "run.sh: -s connect or messages" >&2; exit 2 ;; esac
command -v tsung >/dev/null || { echo "run.sh: tsung is not installed (apt-get install tsung)" >&2; exit 2; }

logdir="${logdir:-$PWD/tsung-logs/run-$(date +%Y%m%d-%H%M%S)-$$}"
mkdir -p "$logdir"
config="$logdir/$scenario.xml"

# Source addresses, only for a loopback server (127.0.0.0/8).
sources=""
if [[ "$host" == 127.* || "$host" == localhost ]]; then
    read -r low high < /proc/sys/net/ipv4/ip_local_port_range
    per_source=$(( (high - low + 1) * 9 / 10 ))
    count=$(( (users + per_source - 1) / per_source ))
    for ((n = 0; n < count; n++)); do
        address=$(( (127 << 24) + 2 + n ))
        sources+="      <ip value=\"$((address >> 24 & 255)).$((address >> 16 & 255)).$((address >> 8 & 255)).$((address & 255))\"/>"$'\n'
    done
fi
# tsung draws arrivals at random around the rate, and its first second goes to warming
# up: a phase of exactly users/rate seconds starts fewer users. Twice that, plus 2 s;
# maxnumber stops the phase at the users asked for.
arrival=$(( 2 * ((users + rate - 1) / rate) + 2 ))
files=$(ulimit -Hn)
if [[ "$files" != unlimited ]] && (( users > files - 1000 )); then
    echo "run.sh: warning: one tsung VM holds at most ~$((files - 1000)) sockets (open files $files);" \
         "users above that fail to connect" >&2
fi

# The scenario with this run's numbers; the source-address block is replaced whole.
awk -v sources="$sources" '
    /<!-- source addresses -->/ { print; printf "%s", sources; skip = 1; next }
    /<!-- \/source addresses -->/ { skip = 0 }
    !skip { print }' "$here/$scenario.xml" |
sed -e "s|<server host=\"[^\"]*\" port=\"[^\"]*\"|<server host=\"$host\" port=\"$port\"|" \
    -e "s|<load duration=\"[^\"]*\"|<load duration=\"$duration\"|" \
    -e "s|<arrivalphase phase=\"1\" duration=\"[^\"]*\"|<arrivalphase phase=\"1\" duration=\"$arrival\"|" \
    -e "s|maxnumber=\"[^\"]*\" arrivalrate=\"[^\"]*\"|maxnumber=\"$users\" arrivalrate=\"$rate\"|" \
    -e "s|maxusers=\"[^\"]*\"|maxusers=\"$users\"|" \
    -e "s|<thinktime value=\"[0-9]*\" random=\"true\"/>|<thinktime value=\"$interval\" random=\"true\"/>|" \
    > "$config"

epmd_before=" $(pgrep -x epmd | tr '\n' ' ' || true) "
echo "run.sh: $users users ($scenario) against $host:$port for ${duration}s, $rate/s," \
     "$(grep -c '<ip value' "$config" || true) source addresses"
status=0
# -n: no web GUI (port 8091); -p: Erlang's process limit (one process per user and more);
# -i: a controller name of our own, so two runs on one machine do not collide.
timeout $((duration + 120)) tsung -n -p 1000000 -i "gc$$" -l "$logdir" -f "$config" start \
    > "$logdir/tsung.out" 2>&1 || status=$?

for pid in $(pgrep -x epmd); do
    if [[ "$epmd_before" != *" $pid "* ]]; then
        kill "$pid" 2>/dev/null || true
    fi
done
run_dir="$(ls -d "$logdir"/*/ 2>/dev/null | head -n 1)"
echo "run.sh: tsung exit status $status; logs: ${run_dir:-$logdir} (tsung.log: stats every 10 s)"
exit "$status"
