#!/usr/bin/env bash
# The project's test command (the README's, and CI's through .ci/run):
#   scripts/test.sh [extra cargo test arguments...]
# 1. makes sure PostgreSQL, RabbitMQ and NATS/JetStream run locally (scripts/services.sh),
# 2. installs Debian's chromium and chromium-driver if missing (the page's browser test) and
#    Python's cryptography (the independent log bundle verifier),
#    cargo fmt --check and clippy with warnings as errors,
# 3. drops test databases (ab_test_*) left behind by earlier interrupted runs,
# 4. cargo test --workspace --no-fail-fast "$@", and exits with its status.
set -euo pipefail

started=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source-path=SCRIPTDIR source=services.sh
. "$ROOT/scripts/services.sh"

step() { printf '\n== %s\n' "$*"; }
die() {
    printf 'test.sh: ERROR: %s\n' "$*" >&2
    exit 1
}
# shellcheck disable=SC2317 # called by the EXIT trap
report() {
    local rc=$? t=$((SECONDS - started))
    printf 'test.sh: exit %s after %dm%02ds\n' "$rc" $((t / 60)) $((t % 60))
}
trap report EXIT

step "services"
ensure_services

step "headless Chromium and chromedriver (the query page's browser test)"
# Debian's chromium and chromium-driver; tests/tests/e2e/page.rs drives the browser headless
# over WebDriver against the page served on 127.0.0.1.
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    printf 'chromium: %s\n' "$(chromedriver --version 2>/dev/null | head -1)"
else
    ab_apt_install chromium chromium-driver ||
        die "cannot install chromium and chromium-driver (needed by tests/tests/e2e/page.rs)"
fi

step "python3 with cryptography (the independent bundle verifier, tests/scripts/verify_bundle.py)"
# The log's bundles are also checked by a verifier that is not ours: Python's hashlib and the
# `cryptography` package's Ed25519 (tests/tests/e2e/log_audit.rs).
if ! command -v python3 >/dev/null 2>&1; then
    ab_apt_install python3 || die "cannot install python3"
fi
if ! python3 -c 'import cryptography' >/dev/null 2>&1; then
    python3 -m pip install --quiet cryptography >/dev/null 2>&1 ||
        ab_apt_install python3-cryptography ||
        die "cannot install the Python package cryptography (pip or Debian's python3-cryptography)"
fi
python3 -c 'import cryptography; print("cryptography:", cryptography.__version__)'

step "schema checkers that are not ours (tests/tests/e2e/formats.rs)"
# The destinations' schemas are validated by the packages of their own communities, pinned:
# pycadf (CADF 1.0, OpenStack), ocsf-json-schema (the schema.ocsf.io exports, OCSF 1.8.0) with
# jsonschema, and @elastic/ecs (the ECS 9.4.0 field list), installed outside the clone.
SCHEMA_VENV=${AB_SCHEMA_VENV:-/var/tmp/auditbridge-schema-venv}
ECS_DIR=${AB_ECS_DIR:-/var/tmp/auditbridge-ecs}
if ! "$SCHEMA_VENV/bin/python" -c 'import pycadf, ocsf_json_schema, jsonschema' >/dev/null 2>&1; then
    python3 -m venv "$SCHEMA_VENV" || { ab_apt_install python3-venv && python3 -m venv "$SCHEMA_VENV"; } ||
        die "cannot make a Python venv at $SCHEMA_VENV"
    "$SCHEMA_VENV/bin/pip" install --quiet pycadf==4.1.0 ocsf-json-schema==1.2.0 jsonschema==4.26.0 ||
        die "cannot install pycadf, ocsf-json-schema and jsonschema from PyPI"
fi
if [[ ! -f "$ECS_DIR/node_modules/@elastic/ecs/package.json" ]]; then
    command -v npm >/dev/null 2>&1 || ab_apt_install nodejs npm || die "cannot install npm"
    mkdir -p "$ECS_DIR"
    (cd "$ECS_DIR" && { [[ -f package.json ]] || echo '{"name":"ab-ecs","private":true}' >package.json; } &&
        npm install --silent --no-audit --no-fund --save-exact @elastic/ecs@9.4.0) ||
        die "cannot install @elastic/ecs from the npm registry"
fi
export AB_SCHEMA_VENV=$SCHEMA_VENV AB_ECS_DIR=$ECS_DIR
printf 'schema checkers: %s, %s\n' "$("$SCHEMA_VENV/bin/pip" list 2>/dev/null | grep -Ei '^(pycadf|ocsf-json-schema) ' | tr -s ' ' | paste -sd, -)" \
    "ecs $(node -p "require('$ECS_DIR/node_modules/@elastic/ecs').EcsVersion")"

step "cargo fmt --all -- --check"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing: rustup component add rustfmt"
cargo fmt --all -- --check || die "code is not formatted: run 'cargo fmt --all'"

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing: rustup component add clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "dropping leftover test databases (ab_test_*)"
# Tests create databases named ab_test_* and drop them when done; an interrupted run leaves
# some behind. (Leftover JetStream streams ABT_* are not cleaned here: that needs a NATS client,
# and the tests delete their own streams.)
pg() { PGCONNECT_TIMEOUT=10 timeout 120 psql -X -q -h 127.0.0.1 -p 5432 -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }
if dbs=$(pg -Atc "select datname from pg_database where datname like 'ab\_test\_%' order by 1"); then
    dropped=0
    while IFS= read -r db; do
        [[ -n $db ]] || continue
        if pg -c "DROP DATABASE IF EXISTS \"${db//\"/\"\"}\" WITH (FORCE)"; then
            dropped=$((dropped + 1))
        else
            printf 'test.sh: warning: could not drop database %s\n' "$db" >&2
        fi
    done <<<"$dbs"
    printf 'dropped %d leftover test database(s)\n' "$dropped"
else
    printf 'test.sh: warning: could not list databases; skipping the cleanup\n' >&2
fi

step "cargo test --workspace --no-fail-fast $*"
# Test binaries run one after another: the end-to-end suite is one binary (e2e, a module per
# area), and faults_global, which restarts the shared services and serialises its own tests,
# another, so nothing runs beside it.
status=0
cargo test --workspace --no-fail-fast "$@" || status=$?
exit "$status"
