#!/usr/bin/env bash
# Make sure the local services Auditbridge needs are installed, running and reachable:
#   PostgreSQL  127.0.0.1:5432  (user postgres, no password: trust for 127.0.0.1)
#   RabbitMQ    127.0.0.1:5672  (AMQP only; the management plugin is neither needed nor enabled)
#   NATS        127.0.0.1:4222  (with JetStream)
# and that a Rust toolchain (cargo, Rust >= 1.94) is on PATH.
#
# Use it either way:
#   bash scripts/services.sh               # ensure everything, print one line per service
#   . scripts/services.sh; ensure_services # from another script (returns non-zero on failure)
#
# Idempotent: when everything is already up it only prints the three "running (already)" lines.
# Missing servers are installed from Debian's packages (apt-get, sudo only when not root) and
# started with commands that work without systemd. Every wait is bounded
# (SERVICES_WAIT_SECONDS, default 60 s per service, polling every 0.5 s).
#
# Shell notes: this file only defines functions when sourced; it does not change the caller's
# shell options. The functions check every step themselves, so they behave the same with or
# without `set -e` in the caller.

: "${SERVICES_WAIT_SECONDS:=60}"

_AB_APT_UPDATED=0
_AB_MIN_RUST_MAJOR=1
_AB_MIN_RUST_MINOR=94

_ab_say() { printf '%s\n' "$*"; }
_ab_err() { printf 'services: ERROR: %s\n' "$*" >&2; }
_ab_warn() { printf 'services: warning: %s\n' "$*" >&2; }

# Run a command as root: directly when we are root, through sudo otherwise.
_ab_as_root() {
    if [[ ${EUID:-$(id -u)} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        _ab_err "need root for: $* (not root, and sudo is not installed)"
        return 1
    fi
}

# Install Debian packages (apt-get update once per shell).
ab_apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        _ab_err "apt-get not found: install these packages yourself: $*"
        return 1
    fi
    if [[ $_AB_APT_UPDATED -eq 0 ]]; then
        _ab_say "services: apt-get update"
        if ! _ab_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q; then
            _ab_err "apt-get update failed"
            return 1
        fi
        _AB_APT_UPDATED=1
    fi
    _ab_say "services: apt-get install -y $*"
    if ! _ab_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"; then
        _ab_err "apt-get install $* failed"
        return 1
    fi
}

# True when something accepts TCP connections on host:port.
ab_port_open() {
    # shellcheck disable=SC2016 # $0/$1 expand in the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null
}

# Poll a command every 0.5 s until it succeeds or $1 seconds have passed.
_ab_wait_for() {
    local limit=$1
    shift
    local deadline=$((SECONDS + limit))
    while :; do
        if "$@"; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.5
    done
}

# --------------------------------------------------------------------------------------------
# Rust toolchain
# --------------------------------------------------------------------------------------------
_ab_rust_help() {
    cat >&2 <<EOF
services: ERROR: $1
  Auditbridge needs Rust >= ${_AB_MIN_RUST_MAJOR}.${_AB_MIN_RUST_MINOR} (cargo, rustfmt, clippy). Install it with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal \\
        --component rustfmt,clippy
    . "\$HOME/.cargo/env"
  or update an existing rustup install:  rustup update stable
EOF
}

ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        # rustup puts cargo in ~/.cargo/bin, which a non-login shell (or CI) may not have on PATH.
        local bin="${CARGO_HOME:-$HOME/.cargo}/bin"
        if [[ -x "$bin/cargo" ]]; then
            export PATH="$bin:$PATH"
        fi
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        _ab_rust_help "cargo is not installed (or not on PATH)"
        return 1
    fi
    local ver major minor
    ver=$(rustc --version 2>/dev/null | awk '{print $2}') || ver=""
    if [[ $ver =~ ^([0-9]+)\.([0-9]+) ]]; then
        major=${BASH_REMATCH[1]}
        minor=${BASH_REMATCH[2]}
        if ((major < _AB_MIN_RUST_MAJOR || (major == _AB_MIN_RUST_MAJOR && minor < _AB_MIN_RUST_MINOR))); then
            _ab_rust_help "Rust $ver is too old"
            return 1
        fi
    fi
    return 0
}

# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------
_ab_pg_installed() {
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null && command -v pg_ctlcluster >/dev/null 2>&1
}

# The newest cluster version under /etc/postgresql (Debian layout), empty when there is none.
_ab_pg_version() {
    if [[ -d /etc/postgresql ]]; then
        # shellcheck disable=SC2012 # version directory names are plain numbers
        ls /etc/postgresql | sort -V | tail -1
    fi
}

_ab_pg_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h 127.0.0.1 -p 5432 -t 2
    else
        ab_port_open 127.0.0.1 5432
    fi
}

_ab_pg_start() {
    local ver
    ver=$(_ab_pg_version)
    if [[ -z $ver ]]; then
        # Server installed without a cluster: create the default one.
        local newest
        newest=$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | sed -E 's#^/usr/lib/postgresql/([^/]+)/.*#\1#' | sort -V | tail -1)
        _ab_say "services: creating PostgreSQL cluster $newest/main"
        _ab_as_root pg_createcluster "$newest" main || return 1
        ver=$newest
    fi
    # May say "cluster is already running" when the package's post-install just started it;
    # the readiness wait decides.
    # $ver is the newest cluster: $(ls /etc/postgresql | sort -V | tail -1)
    _ab_as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start ||
        _ab_warn "pg_ctlcluster $ver main start returned non-zero; waiting for the server anyway"
}

# 0: psql as postgres over 127.0.0.1 works without a password; 2: authentication error;
# 1: another error (message in _AB_PG_ERR).
_AB_PG_ERR=""
_ab_pg_auth_check() {
    local out
    if out=$(env -u PGPASSWORD PGCONNECT_TIMEOUT=5 \
        psql -X -w -h 127.0.0.1 -p 5432 -U postgres -d postgres -Atqc 'select 1' 2>&1); then
        return 0
    fi
    _AB_PG_ERR=$out
    if grep -Eqi 'authentication failed|no password supplied|fe_sendauth|no pg_hba.conf entry' <<<"$out"; then
        return 2
    fi
    return 1
}

_ab_pg_trust_local() {
    local ver hba
    ver=$(_ab_pg_version)
    hba="/etc/postgresql/$ver/main/pg_hba.conf"
    if [[ -z $ver ]] || ! _ab_as_root test -f "$hba"; then
        _ab_err "cannot find pg_hba.conf (looked for $hba)"
        return 1
    fi
    cat >&2 <<EOF

################################################################################################
##  services: SWITCHING PostgreSQL TO PASSWORDLESS 'trust' AUTH FOR 127.0.0.1 AND ::1
##  file: $hba  (backup next to it: pg_hba.conf.auditbridge.bak)
##  Any local user can now connect as any database user, including postgres, without a
##  password. This is meant for a local demo/test machine ONLY; never do this on a server
##  that holds real data.
################################################################################################

EOF
    _ab_as_root cp -p "$hba" "$hba.auditbridge.bak" || return 1
    _ab_as_root sed -E -i \
        -e 's#^([[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+).*$#\1trust#' \
        -e 's#^([[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+::1/128[[:space:]]+).*$#\1trust#' \
        "$hba" || return 1
    # No such line at all (a customised file): put one first, pg_hba.conf is first-match.
    if ! _ab_as_root grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
        _ab_as_root sed -i '1i host all all 127.0.0.1/32 trust  # added by auditbridge scripts/services.sh (local test machine only)' "$hba" || return 1
    fi
    _ab_as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload || return 1
    local rc
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        rc=0
        _ab_pg_auth_check || rc=$?
        if [[ $rc -eq 0 ]]; then
            return 0
        fi
        sleep 0.5
    done
    _ab_err "psql -h 127.0.0.1 -U postgres still fails after switching to trust: $_AB_PG_ERR"
    return 1
}

# --------------------------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------------------------
_ab_rabbit_installed() { [[ -x /usr/sbin/rabbitmq-server && -x /usr/sbin/rabbitmqctl ]]; }

# An Erlang node of the rabbitmq user is up (e.g. still booting) even if 5672 is not open yet.
_ab_rabbit_node_running() { pgrep -u rabbitmq beam.smp >/dev/null 2>&1; }

_ab_rabbit_start() {
    _ab_as_root /usr/sbin/rabbitmq-server -detached ||
        _ab_warn "rabbitmq-server -detached returned non-zero; waiting for the broker anyway"
}

# Readiness is the AMQP port plus `rabbitmqctl await_startup`; the management plugin (HTTP on
# 15672) is never needed, so it is neither enabled nor waited for.
_ab_rabbit_ready() {
    if ! _ab_wait_for "$SERVICES_WAIT_SECONDS" ab_port_open 127.0.0.1 5672; then
        return 1
    fi
    # The AMQP listener is up; make sure the whole application has booted.
    local t=$SERVICES_WAIT_SECONDS
    _ab_as_root timeout $((t + 10)) /usr/sbin/rabbitmqctl -q --timeout "$t" await_startup >/dev/null
}

# --------------------------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------------------------
_ab_nats_installed() { [[ -x /usr/sbin/nats-server ]]; }

# Prints the server's INFO line (sent on connect, before we say anything).
_ab_nats_info() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" && IFS= read -r -t 2 line <&3 && printf "%s\n" "$line"' \
        127.0.0.1 4222 2>/dev/null
}

_ab_nats_start() {
    _ab_as_root mkdir -p /var/lib/nats-server || return 1
    local out
    out=$(_ab_as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log 2>&1) || {
        _ab_err "start-stop-daemon failed to start nats-server: $out"
        return 1
    }
    if [[ $out == *"already running"* ]]; then
        # Another nats-server process (e.g. a test's private instance on another port) made
        # start-stop-daemon think ours runs. Start ours, matched by its own pid file.
        _ab_warn "a nats-server process runs but nothing listens on 4222; starting one for 127.0.0.1:4222"
        _ab_as_root start-stop-daemon --start --oknodo --background \
            --pidfile /run/auditbridge-nats-4222.pid --make-pidfile --exec /usr/sbin/nats-server -- \
            -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || return 1
    fi
}

_ab_nats_check_js() {
    local info
    info=$(_ab_nats_info) || info=""
    if [[ $info != INFO* ]]; then
        _ab_err "nats: 127.0.0.1:4222 is open but did not answer like a NATS server"
        return 1
    fi
    if [[ $info != *'"jetstream":true'* ]]; then
        _ab_err "nats: the server on 127.0.0.1:4222 runs WITHOUT JetStream; restart it with -js" \
            "(e.g. nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server)"
        return 1
    fi
}

# --------------------------------------------------------------------------------------------
# All together
# --------------------------------------------------------------------------------------------
ensure_services() {
    ensure_rust || return 1

    # What each service needs: already | start | install
    local pg=already rabbit=already nats=already
    local -a pkgs=()
    if ! _ab_pg_ready; then
        if _ab_pg_installed; then pg=start; else pg=install; pkgs+=(postgresql); fi
    fi
    if ! ab_port_open 127.0.0.1 5672; then
        if _ab_rabbit_installed; then rabbit=start; else rabbit=install; pkgs+=(rabbitmq-server); fi
    fi
    if ! ab_port_open 127.0.0.1 4222; then
        if _ab_nats_installed; then nats=start; else nats=install; pkgs+=(nats-server); fi
    fi
    # psql/pg_isready are needed by the scripts even when the server runs elsewhere.
    if [[ $pg != install ]] && ! command -v psql >/dev/null 2>&1; then
        pkgs+=(postgresql-client)
    fi
    if ((${#pkgs[@]} > 0)); then
        ab_apt_install "${pkgs[@]}" || return 1
    fi

    # Start whatever is not listening (a package's post-install may already have started it).
    if [[ $pg != already ]] && ! _ab_pg_ready; then
        _ab_pg_start || return 1
    fi
    if [[ $rabbit != already ]] && ! ab_port_open 127.0.0.1 5672; then
        if [[ $rabbit == start ]] && _ab_rabbit_node_running; then
            _ab_say "services: a RabbitMQ node is already booting; waiting for it"
        else
            _ab_rabbit_start || return 1
        fi
    fi
    if [[ $nats != already ]] && ! ab_port_open 127.0.0.1 4222; then
        _ab_nats_start || return 1
    fi

    local -A label=([already]="running (already)" [start]="started" [install]="installed and started")

    # PostgreSQL
    if ! _ab_wait_for "$SERVICES_WAIT_SECONDS" _ab_pg_ready; then
        _ab_err "postgres: not accepting connections on 127.0.0.1:5432 after ${SERVICES_WAIT_SECONDS}s" \
            "(log: /var/log/postgresql/postgresql-$(_ab_pg_version)-main.log)"
        return 1
    fi
    local rc=0
    _ab_pg_auth_check || rc=$?
    if [[ $pg == install || $rc -eq 2 ]]; then
        _ab_pg_trust_local || return 1
    elif [[ $rc -ne 0 ]]; then
        _ab_err "postgres: psql -h 127.0.0.1 -U postgres failed: $_AB_PG_ERR"
        return 1
    fi
    _ab_say "postgres: ${label[$pg]}"

    # RabbitMQ
    if [[ $rabbit != already ]]; then
        if ! _ab_rabbit_ready; then
            _ab_err "rabbitmq: not up on 127.0.0.1:5672 after ${SERVICES_WAIT_SECONDS}s" \
                "(logs: /var/log/rabbitmq/; if a node runs with its application stopped:" \
                "rabbitmqctl start_app)"
            return 1
        fi
    fi
    _ab_say "rabbitmq: ${label[$rabbit]}"

    # NATS + JetStream
    if ! _ab_wait_for "$SERVICES_WAIT_SECONDS" ab_port_open 127.0.0.1 4222; then
        _ab_err "nats: not accepting connections on 127.0.0.1:4222 after ${SERVICES_WAIT_SECONDS}s" \
            "(log: /var/log/nats-server.log)"
        return 1
    fi
    _ab_nats_check_js || return 1
    _ab_say "nats: ${label[$nats]}"
    return 0
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -uo pipefail
    case "${1:-}" in
        -h | --help)
            sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
    esac
    ensure_services
    exit $?
fi
