#!/usr/bin/env bash
# Install (when missing) and start what the test suite and a developer's machine need:
# PostgreSQL with logical decoding, MariaDB with a ROW binary log with full row metadata,
# Mosquitto, all on loopback; the Prometheus tools the deploy checks use; Debian's Chromium
# for the console's browser tests; Java and Maven for Apache Kafka (`make kafka` fetches its
# jars from Maven Central).
#
# `make test` runs it before the suite; a developer can run it by hand (as root). It is
# idempotent: an installed package is not installed again, a running server that is already
# prepared is left alone, a running server that is not is reconfigured and restarted once.
# It prints what it installed and started and how long each step took.
#
# These are development servers: PostgreSQL trusts connections from loopback (any local
# user can connect as any role, the superuser included) and MariaDB's root has no password
# (over loopback TCP and the socket), so the suite's fixtures can connect without secrets.
# None of them listens beyond loopback. Never run this on a shared or production host.
set -euo pipefail

cd "$(dirname "$0")/../.."

PGHOST=127.0.0.1
PGPORT=5432
PGUSER=postgres
MARIADB_PORT=3306
MQTT_PORT=1883
MYSQL=(mysql -uroot -h127.0.0.1 -P"$MARIADB_PORT" --batch --skip-column-names)

log() { echo "services: $*" >&2; }

# step NAME FUNCTION: runs FUNCTION, prints how long it took; a failure is remembered.
status=0
step() {
    local name=$1 started=$SECONDS
    if "$2"; then
        log "$name ready ($((SECONDS - started)) s)"
    else
        log "$name FAILED ($((SECONDS - started)) s)"
        status=1
    fi
}

wait_for() {  # wait_for DESCRIPTION SECONDS COMMAND...
    local what=$1 limit=$2; shift 2
    local deadline=$((SECONDS + limit))
    while ((SECONDS < deadline)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.3
    done
    log "$what did not answer within $limit s"; return 1
}

listening() {  # listening PORT: something accepts TCP connections on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# --- packages -----------------------------------------------------------------------------

PACKAGES=(
    postgresql postgresql-contrib   # source database (CDC: pgoutput)
    mariadb-server mariadb-client   # source database (CDC: binlog)
    mosquitto mosquitto-clients     # MQTT broker for the device collector tests
    prometheus prometheus-alertmanager  # promtool and amtool (tests/deploy)
    chromium fonts-wqy-microhei     # Playwright drives Debian's Chromium; a CJK font
    maven                           # fetches the Apache Kafka jars (`make kafka`)
)
# Apache Kafka 4 needs Java 17 or newer: a JDK already on the machine is used as it is;
# only without one is Debian's installed.
JAVA_PACKAGE=openjdk-17-jre-headless

java_ok() {
    local java version
    java=$(command -v java) || return 1
    version=$("$java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
    [[ -n $version && $version -ge 17 ]]
}

install_packages() {
    local missing=() package
    for package in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed"; then
            missing+=("$package")
        fi
    done
    java_ok || missing+=("$JAVA_PACKAGE")
    if ((${#missing[@]} == 0)); then
        log "packages: all ${#PACKAGES[@]} installed already"
        return 0
    fi
    if [[ $(id -u) != 0 ]]; then
        log "packages missing: ${missing[*]}; run this script as root (apt-get install)"
        return 1
    fi
    log "packages: installing ${missing[*]} (apt-get; a fresh machine takes a few minutes)"
    export DEBIAN_FRONTEND=noninteractive
    # Services must not be started by the package scripts (no init system here): this
    # script starts them itself, on loopback, with the settings CDC needs.
    local policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # also when interrupted
    fi
    apt-get update -q >/dev/null || log "apt-get update failed; trying the package lists there are"
    # One install per package, so that one package the mirror lacks does not stop the rest.
    local failed=()
    for package in "${missing[@]}"; do
        apt-get install -y -q --no-install-recommends "$package" >/dev/null \
            || failed+=("$package")
    done
    if ((${#failed[@]})); then
        log "packages that could not be installed: ${failed[*]}"
        return 1
    fi
}

# --- PostgreSQL ---------------------------------------------------------------------------

pg_cluster() {  # the version of the Debian cluster named main (the newest if several)
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
    [[ -n $version ]] || return 1
    echo "$version"
}

pg_sql() { psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -tAXc "$1"; }

pg_configure() {  # prints "changed" when a file was written
    local version=$1 conf_dir=/etc/postgresql/$1/main changed=0
    local conf=$conf_dir/conf.d/medstream.conf
    local wanted="# Written by medstream deploy/dev/services.sh: logical decoding for CDC tests.
listen_addresses = 'localhost'
port = $PGPORT
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20"
    mkdir -p "$conf_dir/conf.d"
    if [[ ! -f $conf ]] || [[ "$(cat "$conf")" != "$wanted" ]]; then
        echo "$wanted" > "$conf"; changed=1
    fi
    # Loopback connections without a password (a development server only).
    local hba=$conf_dir/pg_hba.conf marker="# medstream deploy/dev/services.sh: loopback trust"
    if ! grep -qF "$marker" "$hba"; then
        local rest; rest=$(cat "$hba")
        printf '%s\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nhost replication all 127.0.0.1/32 trust\nhost replication all ::1/128 trust\n\n%s\n' \
            "$marker" "$rest" > "$hba"
        changed=1
    fi
    ((changed)) && echo changed
    return 0
}

prepare_postgres() {
    local version
    version=$(pg_cluster) || { log "PostgreSQL: no cluster in /etc/postgresql"; return 1; }
    [[ -d /etc/postgresql/$version/main ]] || pg_createcluster "$version" main >/dev/null
    local changed; changed=$(pg_configure "$version")
    if pg_ctlcluster "$version" main status >/dev/null 2>&1; then
        if [[ -n $changed ]] || [[ "$(pg_sql 'show wal_level' 2>/dev/null)" != logical ]]; then
            log "PostgreSQL $version: restarting with logical decoding and loopback trust"
            pg_ctlcluster --skip-systemctl-redirect "$version" main restart
        else
            log "PostgreSQL $version: running already, logical decoding on"
        fi
    elif listening "$PGPORT"; then
        log "PostgreSQL: port $PGPORT is taken by a server this script does not manage"
        [[ "$(pg_sql 'show wal_level' 2>/dev/null)" == logical ]] || return 1
    else
        log "PostgreSQL $version: starting on $PGHOST:$PGPORT"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start
    fi
    wait_for PostgreSQL 30 pg_sql 'select 1' || return 1
    [[ "$(pg_sql 'show wal_level')" == logical ]] \
        || { log "PostgreSQL: wal_level is $(pg_sql 'show wal_level'), not logical"; return 1; }
    if [[ -z "$(pg_sql "select 1 from pg_database where datname = 'test'")" ]]; then
        pg_sql 'create database test' >/dev/null && log "PostgreSQL: created database test"
    fi
}

# --- MariaDB ------------------------------------------------------------------------------

MARIADB_CNF=/etc/mysql/mariadb.conf.d/99-medstream.cnf

mariadb_state() {
    "${MYSQL[@]}" -e 'select concat(@@log_bin, @@binlog_format, @@binlog_row_metadata, @@binlog_row_image)'
}

mariadb_running() { pgrep -x mariadbd >/dev/null || pgrep -x mysqld >/dev/null; }

mariadb_start() {
    install -d -o mysql -g mysql /run/mysqld
    start-stop-daemon --start --oknodo --background --chuid mysql --exec /usr/sbin/mariadbd
    # Over the socket, the operating system's root is MariaDB's root (unix_socket).
    wait_for "MariaDB socket" 30 mysql -uroot --protocol=socket -e 'select 1'
}

prepare_mariadb() {
    local wanted="# Written by medstream deploy/dev/services.sh: binlog CDC for the test suite.
[mysqld]
# Started as root (by this script or a test that restarts it), it runs as mysql.
user = mysql
bind-address = 127.0.0.1
port = $MARIADB_PORT
server_id = 1
log_bin = mariadb-bin
binlog_format = ROW
binlog_row_image = FULL
binlog_row_metadata = FULL
expire_logs_days = 2"
    local changed=0
    mkdir -p "$(dirname "$MARIADB_CNF")"
    if [[ ! -f $MARIADB_CNF ]] || [[ "$(cat "$MARIADB_CNF")" != "$wanted" ]]; then
        echo "$wanted" > "$MARIADB_CNF"; changed=1
    fi
    if mariadb_running; then
        if ((changed)) || [[ "$(mariadb_state 2>/dev/null)" != @(1|ON)ROWFULLFULL ]]; then
            log "MariaDB: restarting with a ROW binary log with full metadata"
            mysqladmin -uroot --protocol=socket shutdown 2>/dev/null \
                || mysqladmin -uroot -h127.0.0.1 shutdown
            wait_for "MariaDB shutdown" 30 bash -c '! pgrep -x mariadbd && ! pgrep -x mysqld'
            mariadb_start || return 1
        else
            log "MariaDB: running already, binlog ROW with full metadata"
        fi
    elif listening "$MARIADB_PORT"; then
        log "MariaDB: port $MARIADB_PORT is taken by a server this script does not manage"
        return 1
    else
        log "MariaDB: starting on 127.0.0.1:$MARIADB_PORT"
        mariadb_start || return 1
    fi
    # root without a password from loopback over TCP (a development server only).
    if ! "${MYSQL[@]}" -e 'select 1' >/dev/null 2>&1; then
        log "MariaDB: letting root connect from loopback without a password"
        mysql -uroot --protocol=socket -e \
            "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('')"
    fi
    wait_for MariaDB 30 "${MYSQL[@]}" -e 'select 1' || return 1
    "${MYSQL[@]}" -e 'create database if not exists test'
    local state; state=$(mariadb_state)
    [[ $state == @(1|ON)ROWFULLFULL ]] \
        || { log "MariaDB: binlog settings are $state, not ROW with full metadata"; return 1; }
}

# --- Mosquitto ----------------------------------------------------------------------------

MOSQUITTO_DIR=/var/lib/medstream-dev/mosquitto

prepare_mosquitto() {
    if listening "$MQTT_PORT"; then
        log "Mosquitto: something listens on 127.0.0.1:$MQTT_PORT already"
        return 0
    fi
    mkdir -p "$MOSQUITTO_DIR"
    # A development broker on loopback; the device collector tests start their own brokers
    # with per-device credentials (tests/producers/test_devices.py).
    cat > "$MOSQUITTO_DIR/mosquitto.conf" <<CONF
# Written by medstream deploy/dev/services.sh: a development MQTT broker on loopback.
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest file $MOSQUITTO_DIR/mosquitto.log
CONF
    # Mosquitto drops to its own user: it must be able to write its log here.
    chown mosquitto: "$MOSQUITTO_DIR" 2>/dev/null || true
    chmod 0750 "$MOSQUITTO_DIR"
    log "Mosquitto: starting on 127.0.0.1:$MQTT_PORT"
    /usr/sbin/mosquitto -d -c "$MOSQUITTO_DIR/mosquitto.conf"
    wait_for Mosquitto 10 listening "$MQTT_PORT"
}

# --- tools --------------------------------------------------------------------------------

check_tools() {
    local tool missing=0
    for tool in promtool amtool chromium mosquitto_passwd mvn; do
        command -v "$tool" >/dev/null || { log "$tool is missing"; missing=1; }
    done
    java_ok || { log "Java 17 or newer is missing"; missing=1; }
    return $missing
}

started=$SECONDS
step packages install_packages
step PostgreSQL prepare_postgres
step MariaDB prepare_mariadb
step Mosquitto prepare_mosquitto
step tools check_tools
if ((status == 0)); then
    log "all services ready in $((SECONDS - started)) s"
else
    log "some services are not ready (see above) after $((SECONDS - started)) s"
fi
exit $status
