#!/usr/bin/env bash
# Bring up a local Auditbridge cluster and watch a live demo.
#
#   scripts/up.sh               ensure services, build, migrate, start $WORKERS workers and a
#                               demo publisher, then refresh status every 5 s until Ctrl-C
#                               (which stops the publisher and the workers)
#   scripts/up.sh --no-follow   same, but print the status once after ~10 s and leave the
#                               cluster running in the background (also: DEMO_FOLLOW=0)
#   scripts/up.sh --stop        stop a cluster left running by --no-follow
#
# Environment:
#   WORKERS      number of workers (default 2); worker i (1..WORKERS) serves /metrics,
#                /healthz and /readyz on 127.0.0.1:$((9464 + i))
#   DEMO_EVENTS  events the demo publisher generates (default 1000000)
#   DEMO_RATE    events per second it publishes (default 500)
#   DEMO_FOLLOW  1 (default) to follow, 0 like --no-follow
#   DEMO_WRITER_URL / DEMO_READER_URL  what the workers / serve and status connect with
#                (default: AUDITBRIDGE_DATABASE_URL as auditbridge_writer / auditbridge_reader,
#                the least-privilege roles `migrate` creates; trust authentication, no password)
#   AUDITBRIDGE_* are passed to every command (see the design brief), except that each
#   worker gets its own AUDITBRIDGE_METRICS_ADDR. Without AUDITBRIDGE_DESTINATIONS (or a
#   config file) the demo forwards to RabbitMQ's amq.topic exchange.
# Logs and pid files go to .demo/ at the repository root.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEMO_DIR="$ROOT/.demo"
# shellcheck source-path=SCRIPTDIR source=services.sh
. "$ROOT/scripts/services.sh"

STOP_TIMEOUT=15 # seconds between SIGTERM and SIGKILL
READY_TIMEOUT=60
BASE_PORT=9464

log() { printf '[up] %s\n' "$*"; }
die() {
    printf '[up] ERROR: %s\n' "$*" >&2
    exit 1
}
usage() { sed -n '2,23p' "$ROOT/scripts/up.sh" | sed 's/^# \{0,1\}//'; }

# ---------------------------------------------------------------------------------------------
# Process helpers (pids are only ever taken from our own pid files, and checked to be ours)
# ---------------------------------------------------------------------------------------------

# Running (not a zombie)?
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# Is pid an auditbridge process (guards against a recycled pid)?
ours() {
    [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q auditbridge
}

# Prints the pid recorded in a pid file if that process is alive and ours.
pid_from() {
    local f=$1 pid
    [[ -f $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    alive "$pid" && ours "$pid" || return 1
    printf '%s\n' "$pid"
}

# SIGTERM the given pids, wait up to STOP_TIMEOUT s, SIGKILL what is left.
stop_pids() {
    local what=$1
    shift
    local -a pids=()
    local pid
    for pid in "$@"; do
        if alive "$pid" && ours "$pid"; then pids+=("$pid"); fi
    done
    ((${#pids[@]} > 0)) || return 0
    log "stopping $what (pid ${pids[*]}): SIGTERM, up to ${STOP_TIMEOUT}s"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT)) left
    while :; do
        left=()
        for pid in "${pids[@]}"; do
            if alive "$pid"; then left+=("$pid"); fi
        done
        ((${#left[@]} > 0)) || break
        if ((SECONDS >= deadline)); then
            log "still running after ${STOP_TIMEOUT}s, SIGKILL: ${left[*]}"
            kill -KILL "${left[@]}" 2>/dev/null || true
            break
        fi
        sleep 0.5
    done
    # Reap our own children (no-op for processes of an earlier run).
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}

# Stop the publisher first (so workers can drain), then all workers.
stop_cluster() {
    local pid f
    local -a workers=()
    if pid=$(pid_from "$DEMO_DIR/publish.pid"); then
        stop_pids publisher "$pid"
    fi
    if pid=$(pid_from "$DEMO_DIR/serve.pid"); then
        stop_pids api "$pid"
    fi
    for f in "$DEMO_DIR"/worker-*.pid; do
        [[ -e $f ]] || continue
        if pid=$(pid_from "$f"); then workers+=("$pid"); fi
    done
    if ((${#workers[@]} > 0)); then
        stop_pids workers "${workers[@]}"
    fi
    rm -f "$DEMO_DIR"/publish.pid "$DEMO_DIR"/serve.pid "$DEMO_DIR"/worker-*.pid
    log "logs: $DEMO_DIR/worker-*.log, $DEMO_DIR/publish.log, $DEMO_DIR/serve.log"
}

running_pids() {
    local f pid
    for f in "$DEMO_DIR"/publish.pid "$DEMO_DIR"/serve.pid "$DEMO_DIR"/worker-*.pid; do
        [[ -e $f ]] || continue
        if pid=$(pid_from "$f"); then printf '%s ' "$pid"; fi
    done
}

# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
mode=run
follow=${DEMO_FOLLOW:-1}
while (($# > 0)); do
    case $1 in
        --no-follow) follow=0 ;;
        --follow) follow=1 ;;
        --stop) mode=stop ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
    shift
done

if [[ $mode == stop ]]; then
    if [[ -z $(running_pids) ]]; then
        rm -f "$DEMO_DIR"/publish.pid "$DEMO_DIR"/serve.pid "$DEMO_DIR"/worker-*.pid
        log "no demo cluster is running"
        exit 0
    fi
    stop_cluster
    exit 0
fi

WORKERS=${WORKERS:-2}
if ! [[ $WORKERS =~ ^[1-9][0-9]*$ ]] || ((WORKERS > 64)); then
    die "WORKERS must be 1..64 (got '$WORKERS')"
fi
DEMO_EVENTS=${DEMO_EVENTS:-1000000}
DEMO_RATE=${DEMO_RATE:-500}

existing=$(running_pids)
if [[ -n $existing ]]; then
    die "a demo cluster is already running (pids $existing); stop it first: scripts/up.sh --stop"
fi

# ---------------------------------------------------------------------------------------------
# Services, build, migrate
# ---------------------------------------------------------------------------------------------
ensure_services
command -v curl >/dev/null 2>&1 || ab_apt_install curl

log "cargo build --release -p auditbridge"
cargo build --release -p auditbridge

target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
    grep -o '"target_directory":"[^"]*"' | head -1 | cut -d'"' -f4) || target_dir=""
[[ -n $target_dir ]] || target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
BIN="$target_dir/release/auditbridge"
[[ -x $BIN ]] || die "built binary not found at $BIN"

# `migrate` runs as the URL's user (the local superuser by default), creates the roles and
# grants them (README, "Database roles"); the services then connect as those roles.
DB_URL=${AUDITBRIDGE_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/auditbridge}
export AUDITBRIDGE_MIGRATE_DATABASE_URL=${AUDITBRIDGE_MIGRATE_DATABASE_URL:-$DB_URL}
# DB_URL with its user (and password) replaced by $1.
role_url() {
    local scheme=${DB_URL%%://*} rest=${DB_URL#*://} authority path
    authority=${rest%%/*}
    path=${rest#"$authority"}
    printf '%s://%s@%s%s\n' "$scheme" "$1" "${authority##*@}" "$path"
}
WRITER_URL=${DEMO_WRITER_URL:-$(role_url auditbridge_writer)}
READER_URL=${DEMO_READER_URL:-$(role_url auditbridge_reader)}
export WRITER_URL READER_URL

mkdir -p "$DEMO_DIR"
rm -f "$DEMO_DIR"/worker-*.log "$DEMO_DIR"/publish.log
log "auditbridge migrate"
timeout 300 "$BIN" migrate 2>&1 | tee "$DEMO_DIR/migrate.log" || die "migrate failed (log: $DEMO_DIR/migrate.log)"
if command -v psql >/dev/null 2>&1; then
    for url in "$WRITER_URL" "$READER_URL"; do
        role=${url#*://}
        role=${role%%@*}
        psql "$url" -Atqc 'SELECT 1' >/dev/null 2>&1 ||
            die "cannot connect to PostgreSQL as ${role%%:*} (no trust authentication for it?): set the roles' passwords (README, \"Database roles\") and DEMO_WRITER_URL / DEMO_READER_URL"
    done
fi

for ((i = 1; i <= WORKERS; i++)); do
    port=$((BASE_PORT + i))
    if ab_port_open 127.0.0.1 "$port"; then
        die "port 127.0.0.1:$port (metrics of worker $i) is already in use"
    fi
done

# ---------------------------------------------------------------------------------------------
# Start workers and publisher
# ---------------------------------------------------------------------------------------------
keep_running=0
sleep_pid=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    trap '' INT # let the shutdown finish (it is bounded)
    set +e
    [[ -n $sleep_pid ]] && kill "$sleep_pid" 2>/dev/null
    if [[ $keep_running -eq 0 ]]; then
        echo
        stop_cluster
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The demo forwards every event to RabbitMQ's built-in amq.topic exchange (no queue is bound,
# so the broker confirms and drops them; bind a queue to "#" to watch them arrive), unless the
# caller configured destinations of their own.
if [[ -z ${AUDITBRIDGE_DESTINATIONS:-} && -z ${AUDITBRIDGE_CONFIG:-} ]]; then
    export AUDITBRIDGE_DESTINATIONS='[{"name":"demo-bus","type":"rabbitmq","params":{"url":"amqp://guest:guest@127.0.0.1:5672/%2f","exchange":"amq.topic","mandatory":false}}]'
    log "destination demo-bus: RabbitMQ exchange amq.topic (set AUDITBRIDGE_DESTINATIONS to use your own)"
fi

# The key of the ids that webhook and file sources derive (AUDITBRIDGE_ID_KEY): one secret
# shared by every serve and tail-file. Kept in .demo/ so that a restarted demo derives the same
# ids; a caller's own value wins.
if [[ -z ${AUDITBRIDGE_ID_KEY:-} ]]; then
    if [[ ! -s $DEMO_DIR/id-key ]]; then
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$DEMO_DIR/id-key")
    fi
    AUDITBRIDGE_ID_KEY=$(<"$DEMO_DIR/id-key")
    export AUDITBRIDGE_ID_KEY
    log "id key for derived ids: .demo/id-key (set AUDITBRIDGE_ID_KEY to use your own)"
fi

# setsid: own session, so a terminal's Ctrl-C or hang-up reaches only this script, which then
# stops the processes in order (and --no-follow leaves them running after we exit).
for ((i = 1; i <= WORKERS; i++)); do
    AUDITBRIDGE_METRICS_ADDR="127.0.0.1:$((BASE_PORT + i))" AUDITBRIDGE_DATABASE_URL=$WRITER_URL \
        setsid "$BIN" worker </dev/null >"$DEMO_DIR/worker-$i.log" 2>&1 &
    echo $! >"$DEMO_DIR/worker-$i.pid"
    log "worker $i: pid $!, metrics 127.0.0.1:$((BASE_PORT + i)), database role auditbridge_writer, log .demo/worker-$i.log"
done

deadline=$((SECONDS + READY_TIMEOUT))
for ((i = 1; i <= WORKERS; i++)); do
    port=$((BASE_PORT + i))
    pid=$(<"$DEMO_DIR/worker-$i.pid")
    while :; do
        code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$port/readyz" 2>/dev/null) || true
        [[ $code == 200 ]] && break
        if ! alive "$pid"; then
            tail -n 30 "$DEMO_DIR/worker-$i.log" >&2 || true
            die "worker $i exited before becoming ready (log: $DEMO_DIR/worker-$i.log)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$DEMO_DIR/worker-$i.log" >&2 || true
            die "worker $i not ready on http://127.0.0.1:$port/readyz after ${READY_TIMEOUT}s (last HTTP status: ${code:-none})"
        fi
        sleep 0.5
    done
    log "worker $i: ready"
done

# The query API with a fresh admin token for this demo only (its hash is all the server
# keeps). The page's URL carries the token in the fragment, which the browser never sends.
API_ADDR=${AUDITBRIDGE_API_ADDR:-127.0.0.1:8080}
token_out=$("$BIN" token new --name demo --admin --scopes read,ingest) || die "auditbridge token new failed"
DEMO_TOKEN=$(sed -n 's/^token (shown once, give it to the client): //p' <<<"$token_out")
DEMO_TOKEN_ENTRY=$(sed -n 's/^AUDITBRIDGE_API_TOKENS item: //p' <<<"$token_out")
AUDITBRIDGE_API_ADDR=$API_ADDR AUDITBRIDGE_API_TOKENS="[${DEMO_TOKEN_ENTRY}]" AUDITBRIDGE_DATABASE_URL=$READER_URL \
    setsid "$BIN" serve </dev/null >"$DEMO_DIR/serve.log" 2>&1 &
echo $! >"$DEMO_DIR/serve.pid"
umask 077
printf '%s\n' "$DEMO_TOKEN" >"$DEMO_DIR/demo-token"
log "api: pid $!, http://$API_ADDR/#token=$DEMO_TOKEN&tenant=acme (the page: recent events, live tail, charts), log .demo/serve.log"
log "api: the demo's admin token is in .demo/demo-token, e.g. curl -H \"Authorization: Bearer \$(cat .demo/demo-token)\" 'http://$API_ADDR/v1/events?tenant=acme&limit=5'"

setsid "$BIN" publish --generate "$DEMO_EVENTS" --tenants 8 --rate "$DEMO_RATE" \
    </dev/null >"$DEMO_DIR/publish.log" 2>&1 &
echo $! >"$DEMO_DIR/publish.pid"
log "publisher: pid $!, $DEMO_EVENTS events at $DEMO_RATE/s, log .demo/publish.log"

# ---------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------
prev_total=""
prev_time=""

# Sum of auditbridge_events_persisted_total on one worker's /metrics, or "?".
persisted_of() {
    local out
    out=$(curl -s -m 2 "http://127.0.0.1:$1/metrics" 2>/dev/null |
        awk '/^auditbridge_events_persisted_total[{ ]/ { s += $NF; n++ } END { if (n) printf "%.0f", s; else printf "?" }') || true
    printf '%s' "${out:-?}"
}

print_status() {
    local out rc=0 i v total=0 known=0 now line pid state
    out=$(AUDITBRIDGE_DATABASE_URL=$READER_URL timeout 15 "$BIN" status 2>&1) || rc=$?
    printf '%s\n' "$out"
    ((rc == 0)) || printf '(auditbridge status exited with %s)\n' "$rc"

    line="persisted:"
    for ((i = 1; i <= WORKERS; i++)); do
        pid=$(<"$DEMO_DIR/worker-$i.pid")
        if alive "$pid"; then
            v=$(persisted_of $((BASE_PORT + i)))
        else
            v="DEAD(see .demo/worker-$i.log)"
        fi
        line+=" w$i=$v"
        if [[ $v =~ ^[0-9]+$ ]]; then
            total=$((total + v))
            known=$((known + 1))
        fi
    done
    line+=" total=$total"
    now=$EPOCHREALTIME
    if [[ -n $prev_total && $known -eq $WORKERS ]]; then
        line+=$(awk -v a="$prev_total" -v b="$total" -v t0="$prev_time" -v t1="$now" \
            'BEGIN { dt = t1 - t0; if (dt > 0) printf " | %.0f events/s over the last %.1fs", (b - a) / dt, dt }')
    fi
    if [[ $known -eq $WORKERS ]]; then
        prev_total=$total
        prev_time=$now
    fi
    pid=$(<"$DEMO_DIR/publish.pid")
    if alive "$pid"; then state=running; else state="finished (see .demo/publish.log)"; fi
    line+=" | publisher: $state"
    printf '%s\n' "$line"
}

if [[ $follow == 0 ]]; then
    log "cluster is up; status in ~10 s"
    sleep 10
    print_status
    keep_running=1
    echo
    log "the cluster keeps running in the background (logs and pids in .demo/)"
    log "stop it with: scripts/up.sh --stop"
    exit 0
fi

while :; do
    if [[ -t 1 ]]; then printf '\033[H\033[2J'; else printf '\n'; fi
    printf '== auditbridge demo, %s workers, %s  (Ctrl-C stops everything)\n' "$WORKERS" "$(date '+%F %T')"
    print_status
    sleep 5 &
    sleep_pid=$!
    wait "$sleep_pid" || true
    sleep_pid=""
done
