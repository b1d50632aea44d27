#!/usr/bin/env bash
# Prepare the local PostgreSQL and MariaDB for change data capture, and install the
# Prometheus tools the deploy checks use (idempotent).
#
# `make test` runs this before the suite. On this machine kind both servers run before the
# session with CDC switched off: PostgreSQL needs wal_level=logical (a restart), MariaDB
# needs a binary log in ROW format with full row metadata (a restart). A server that is
# already prepared is left alone; nothing is restarted twice.
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGUSER=${PGUSER:-postgres}
MYSQL=(mysql -uroot -h127.0.0.1 --batch --skip-column-names)

log() { echo "prepare-sources: $*" >&2; }

wait_for() {  # wait_for DESCRIPTION COMMAND...
    local what=$1; shift
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    log "$what did not come back within 30 s"; return 1
}

prepare_postgres() {
    if ! psql -h "$PGHOST" -U "$PGUSER" -tAc 'select 1' >/dev/null 2>&1; then
        log "PostgreSQL is not reachable on $PGHOST:5432; start it with:"
        log "  pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start"
        return 1
    fi
    local level slots
    level=$(psql -h "$PGHOST" -U "$PGUSER" -tAc 'show wal_level')
    slots=$(psql -h "$PGHOST" -U "$PGUSER" -tAc 'show max_replication_slots')
    if [[ "$level" == logical && "$slots" -ge 20 ]]; then
        log "PostgreSQL: wal_level=logical already"
        return 0
    fi
    log "PostgreSQL: setting wal_level=logical, max_replication_slots=20 and restarting"
    psql -h "$PGHOST" -U "$PGUSER" -qc "ALTER SYSTEM SET wal_level = logical" \
        -c "ALTER SYSTEM SET max_replication_slots = 20" \
        -c "ALTER SYSTEM SET max_wal_senders = 20"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main restart
    wait_for PostgreSQL psql -h "$PGHOST" -U "$PGUSER" -tAc 'select 1'
    level=$(psql -h "$PGHOST" -U "$PGUSER" -tAc 'show wal_level')
    [[ "$level" == logical ]] || { log "PostgreSQL: wal_level is still $level"; return 1; }
}

MARIADB_CNF=/etc/mysql/medstream-binlog.cnf

prepare_mariadb() {
    if ! "${MYSQL[@]}" -e 'select 1' >/dev/null 2>&1; then
        log "MariaDB is not reachable on 127.0.0.1:3306; start it with:"
        log "  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"
        return 1
    fi
    local state
    state=$("${MYSQL[@]}" -e 'select concat(@@log_bin, @@binlog_format, @@binlog_row_metadata, @@binlog_row_image)')
    if [[ "$state" == 1ROWFULLFULL || "$state" == ONROWFULLFULL ]]; then
        log "MariaDB: binlog ROW with full metadata already"
        return 0
    fi
    log "MariaDB: enabling the binary log (ROW, full metadata) and restarting"
    cat > "$MARIADB_CNF" <<'CNF'
# Written by medstream deploy/dev/prepare-sources.sh: binlog CDC for the test suite.
[mysqld]
server_id = 1
log_bin = mariadb-bin
binlog_format = ROW
binlog_row_image = FULL
binlog_row_metadata = FULL
expire_logs_days = 2
CNF
    if ! grep -qxF "!include $MARIADB_CNF" /etc/mysql/my.cnf; then
        printf '\n!include %s\n' "$MARIADB_CNF" >> /etc/mysql/my.cnf
    fi
    mysqladmin -uroot -h127.0.0.1 shutdown
    wait_for "MariaDB shutdown" bash -c '! pgrep -x mariadbd'
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_for MariaDB "${MYSQL[@]}" -e 'select 1'
    state=$("${MYSQL[@]}" -e 'select concat(@@log_bin, @@binlog_format, @@binlog_row_metadata, @@binlog_row_image)')
    [[ "$state" == 1ROWFULLFULL || "$state" == ONROWFULLFULL ]] || { log "MariaDB: binlog settings are still $state"; return 1; }
}

# promtool and amtool check deploy/prometheus and deploy/alertmanager (tests/deploy).
prepare_tools() {
    if command -v promtool >/dev/null && command -v amtool >/dev/null; then
        log "promtool and amtool present"
        return 0
    fi
    log "installing promtool and amtool (Debian packages prometheus, prometheus-alertmanager)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        prometheus prometheus-alertmanager >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
             --no-install-recommends prometheus prometheus-alertmanager >/dev/null; }
    command -v promtool >/dev/null && command -v amtool >/dev/null
}

# Debian's Chromium (driven by Playwright in tests/e2e/test_console.py) and a CJK font so
# the console's Chinese labels render in screenshots.
prepare_browser() {
    if command -v chromium >/dev/null && fc-list 2>/dev/null | grep -qi "wenquanyi\|noto sans cjk"; then
        log "chromium and a CJK font present"
        return 0
    fi
    log "installing chromium and fonts-wqy-microhei (Debian packages)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        chromium fonts-wqy-microhei >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
             --no-install-recommends chromium fonts-wqy-microhei >/dev/null; }
    command -v chromium >/dev/null
}

status=0
prepare_postgres || status=1
prepare_mariadb || status=1
prepare_tools || status=1
prepare_browser || status=1
exit $status
