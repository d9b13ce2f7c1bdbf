# shellcheck shell=bash disable=SC2034 # variables used by the scripts that source this
# Shared by deploy/local/{install,stack,services}: paths, ports, logging and the pid-file
# handling that lets `stop` end exactly the processes that `start` began. Sourced, not run.

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
LOCAL_DIR=${AUTOGEN_LOCAL_DIR:-$REPO_ROOT/.local}
mkdir -p "$LOCAL_DIR"
LOCAL_DIR=$(cd "$LOCAL_DIR" && pwd)
RUN_DIR=$LOCAL_DIR/run
LOG_DIR=$LOCAL_DIR/logs
STACK_ENV_FILE=$LOCAL_DIR/stack.env

KAFKA_POM=$REPO_ROOT/deploy/local/kafka/pom.xml
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM")
KAFKA_HOME=${AUTOGEN_KAFKA_HOME:-$HOME/.cache/autogen-fleet/kafka-$KAFKA_VERSION}
KAFKA_LIBS=$KAFKA_HOME/libs
KAFKA_STAMP=$KAFKA_HOME/.complete

PG_BIN=${AUTOGEN_PG_BIN:-/usr/lib/postgresql/15/bin}
# Debian puts these daemons in /usr/sbin, which is not on a normal user's PATH.
MOSQUITTO_BIN=$(command -v mosquitto || echo /usr/sbin/mosquitto)
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
DB_SERVICES=(tokens fleet commands firmware gateway)
HTTP_SERVICES=(tokens fleet commands firmware gateway console)

KAFKA_PORT=${AUTOGEN_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${AUTOGEN_KAFKA_CONTROLLER_PORT:-9093}
PG_PORT=${AUTOGEN_PG_PORT:-55432}
REDIS_PORT=${AUTOGEN_REDIS_PORT:-56379}
MQTT_PORT=${AUTOGEN_MQTT_PORT:-1883}
HTTP_PORT=${AUTOGEN_HTTP_PORT:-8080}

PG_SUPERUSER_PASSWORD=${AUTOGEN_PG_SUPERUSER_PASSWORD:-postgres-dev}
MQTT_ADMIN_USERNAME=${AUTOGEN_MQTT_ADMIN_USERNAME:-autogen-admin}
MQTT_ADMIN_PASSWORD=${AUTOGEN_MQTT_ADMIN_PASSWORD:-mqtt-admin-dev}
GATEWAY_MQTT_USERNAME=${GATEWAY_MQTT_USERNAME:-autogen-gateway}
GATEWAY_MQTT_PASSWORD=${GATEWAY_MQTT_PASSWORD:-gateway-dev}

# How long a server may take to answer after it was started (seconds).
START_TIMEOUT=${AUTOGEN_START_TIMEOUT:-90}
# How long a process may take to exit after SIGTERM before it gets SIGKILL (seconds).
STOP_TIMEOUT=${AUTOGEN_STOP_TIMEOUT:-30}

if [[ -t 1 && -z ${NO_COLOR:-} ]]; then
  _c_bold=$'\e[1m' _c_red=$'\e[31m' _c_green=$'\e[32m' _c_yellow=$'\e[33m' _c_off=$'\e[0m'
else
  _c_bold='' _c_red='' _c_green='' _c_yellow='' _c_off=''
fi

log() { printf '%s==>%s %s\n' "$_c_bold" "$_c_off" "$*"; }
warn() { printf '%swarning:%s %s\n' "$_c_yellow" "$_c_off" "$*" >&2; }
die() {
  printf '%serror:%s %s\n' "$_c_red" "$_c_off" "$*" >&2
  exit 1
}
ok_word() { printf '%sok%s' "$_c_green" "$_c_off"; }
down_word() { printf '%sdown%s' "$_c_red" "$_c_off"; }

is_root() { [[ $(id -u) -eq 0 ]]; }

# Upper-case service name for env variable names: fleet -> FLEET.
upper() { printf '%s' "$1" | tr '[:lower:]-' '[:upper:]_'; }

# Default HTTP port of a service (env <SVC>_HTTP_PORT overrides).
service_port() {
  local var
  var="$(upper "$1")_HTTP_PORT"
  local default
  case $1 in
    tokens) default=8101 ;; fleet) default=8102 ;; commands) default=8103 ;;
    firmware) default=8104 ;; gateway) default=8105 ;; console) default=8106 ;;
    *) die "unknown service: $1" ;;
  esac
  printf '%s' "${!var:-$default}"
}

# Database password of a service (env <SVC>_DB_PASSWORD overrides).
service_db_password() {
  local var
  var="$(upper "$1")_DB_PASSWORD"
  printf '%s' "${!var:-$1-dev}"
}

find_java() {
  if [[ -n ${AUTOGEN_JAVA:-} ]]; then
    printf '%s' "$AUTOGEN_JAVA"
  elif [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
    printf '%s' "$JAVA_HOME/bin/java"
  else
    command -v java || true
  fi
}

# Prints the last lines of a log file, indented, to stderr (for start failures).
tail_log() {
  local file=$1 lines=${2:-30}
  if [[ -f $file ]]; then
    printf -- '--- last %s lines of %s ---\n' "$lines" "$file" >&2
    tail -n "$lines" "$file" | sed 's/^/    /' >&2
  fi
}

# wait_until <seconds> <description> <command...>: polls the command until it succeeds.
wait_until() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      printf '%serror:%s %s did not come up within %ss\n' "$_c_red" "$_c_off" "$what" "$timeout" >&2
      return 1
    fi
    sleep 0.2
  done
}

# --- pid files -------------------------------------------------------------------------
# A pid file alone is not proof: the pid may have been reused by an unrelated process after
# a reboot or crash. Every check therefore also matches the process's command line.

pidfile_of() { printf '%s/%s.pid' "$RUN_DIR" "$1"; }

read_pid() {
  local file=$1 pid
  [[ -f $file ]] || return 1
  read -r pid <"$file" || true
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  printf '%s' "$pid"
}

# pid_matches <pid> <extended regex>: the process exists and its command line matches.
pid_matches() {
  local pid=$1 pattern=$2 cmdline
  [[ -r /proc/$pid/cmdline ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ -n $cmdline ]] || return 1 # a zombie has an empty command line
  [[ $cmdline =~ $pattern ]]
}

# running_pid <name> <pattern>: prints the pid when <name>'s pid file names a live match.
running_pid() {
  local pid
  pid=$(read_pid "$(pidfile_of "$1")") || return 1
  pid_matches "$pid" "$2" || return 1
  printf '%s' "$pid"
}

# stop_pid <name> <pid> <pattern> [signal]: sends the signal (the server's own "shut down
# cleanly" one) to the process only, waits for it to exit, and after STOP_TIMEOUT sends
# SIGKILL, to its whole process group when it leads one (our servers run under setsid), so
# no child outlives it. Does nothing unless the command line still matches.
stop_pid() {
  local name=$1 pid=$2 pattern=$3 sig=${4:-TERM} deadline
  pid_matches "$pid" "$pattern" || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while pid_matches "$pid" "$pattern"; do
    if ((SECONDS >= deadline)); then
      warn "$name (pid $pid) did not exit within ${STOP_TIMEOUT}s; sending SIGKILL"
      if [[ $(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') == "$pid" ]]; then
        kill -KILL -- "-$pid" 2>/dev/null || true
      else
        kill -KILL "$pid" 2>/dev/null || true
      fi
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  return 0
}

# --- directories owned by a daemon's own user -------------------------------------------
# PostgreSQL refuses to run as root and Mosquitto drops to user `mosquitto`, so as root their
# data directories must belong to those users, and every parent must be traversable by them.
# When the checkout lives under a private directory (e.g. /root), the data goes to
# /var/lib/autogen-fleet/<hash of .local>/<name> and .local/<name> becomes a symlink to it.
# Those daemons must then be given the real path (the symlink's path crosses the private
# directory): real_dir resolves it without side effects.

real_dir() { readlink -f "$LOCAL_DIR/$1"; }

# owned_dir <user> <name>: creates .local/<name> for <user> and prints its real path.
owned_dir() {
  local user=$1 name=$2 dir=$LOCAL_DIR/$2 alt
  if ! is_root || [[ $user == root ]]; then
    mkdir -p "$dir"
    real_dir "$name"
    return
  fi
  alt=/var/lib/autogen-fleet/$(printf '%s' "$LOCAL_DIR" | sha1sum | cut -c1-12)/$name
  if [[ -L $dir ]]; then
    mkdir -p "$alt"
  elif [[ ! -e $dir ]]; then
    mkdir -p "$dir"
    chown "$user:" "$dir"
    if ! runuser -u "$user" -- test -w "$dir" 2>/dev/null; then
      # Not reachable for $user: move to /var/lib. A fresh .local means fresh data, so an
      # old directory there (from an earlier .local at the same path) is cleared.
      rmdir "$dir"
      rm -rf "$alt"
      mkdir -p "$alt" "$(dirname "$dir")"
      ln -s "$alt" "$dir"
    fi
  fi
  dir=$(real_dir "$name")
  chown "$user:" "$dir"
  runuser -u "$user" -- test -w "$dir" ||
    die "$dir is not writable by user $user (check the permissions of its parent directories)"
  printf '%s' "$dir"
}
