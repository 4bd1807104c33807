# shellcheck shell=bash
# Shared helpers for the deploy/local/*.sh service scripts (sourced, not run).
#
# Sets REPO_ROOT (resolved from this file's location, so the scripts work from any cwd),
# LOCAL_DIR (runtime data and logs, default <repo>/.local, git-ignored) and CACHE_DIR
# (downloaded artifacts, default ~/.cache/stream-kpis, outside git), and provides small
# process helpers built on pid files. Every service keeps its pid file under LOCAL_DIR, so
# `down` only ever stops a process that one of these scripts started.

COMMON_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$COMMON_DIR/../.." && pwd)"
LOCAL_DIR="${STREAM_KPIS_LOCAL:-$REPO_ROOT/.local}"
CACHE_DIR="${STREAM_KPIS_CACHE:-$HOME/.cache/stream-kpis}"
export REPO_ROOT LOCAL_DIR CACHE_DIR

# log MESSAGE... : progress to stderr, prefixed with the calling script's name.
log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }

# die MESSAGE... : print an error and exit 1.
die() { printf '[%s] ERROR: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# pid_alive PIDFILE PATTERN : true when PIDFILE names a live process whose command line
# contains PATTERN (guards against a stale pid file whose pid was reused by something else).
pid_alive() {
    local pidfile="$1" pattern="$2" pid
    [[ -s "$pidfile" ]] || return 1
    pid="$(<"$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern"
}

# lock_service NAME : hold an exclusive lock for the rest of the script, so that concurrent
# `up`/`down` calls (parallel test workers, two terminals) run one after the other instead of
# racing on the same pid file, ports and storage. Released when the script exits; the
# services are started with `9>&-` so that they do not inherit (and keep) the lock.
lock_service() {
    mkdir -p "$LOCAL_DIR"
    exec 9>"$LOCAL_DIR/.$1.lock"
    flock -w "${STREAM_KPIS_LOCK_TIMEOUT:-300}" 9 ||
        die "another deploy/local script held the $1 lock for too long ($LOCAL_DIR/.$1.lock)"
}

# port_open PORT : true when something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# require_free_port NAME PORT : fail clearly when a port we are about to bind is taken.
require_free_port() {
    if port_open "$2"; then
        die "$1 port 127.0.0.1:$2 is already in use by a process these scripts did not start" \
            "(see: ss -ltnp 'sport = :$2'); stop it or choose another port via the env var."
    fi
}

# stop_pid PIDFILE PATTERN NAME TIMEOUT_S : SIGTERM, wait up to TIMEOUT_S, then SIGKILL.
# Harmless when the process is not running; removes the pid file.
stop_pid() {
    local pidfile="$1" pattern="$2" name="$3" timeout="$4" pid waited=0
    if ! pid_alive "$pidfile" "$pattern"; then
        rm -f "$pidfile"
        log "$name is not running"
        return 0
    fi
    pid="$(<"$pidfile")"
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        if ((waited >= timeout * 10)); then
            log "$name did not stop within ${timeout}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$pidfile"
    log "$name stopped"
}

# print_status NAME PIDFILE PATTERN DETAIL : "NAME: running (pid N) DETAIL" -> 0, else 1.
print_status() {
    local name="$1" pidfile="$2" pattern="$3" detail="$4"
    if pid_alive "$pidfile" "$pattern"; then
        echo "$name: running (pid $(<"$pidfile")) $detail"
        return 0
    fi
    echo "$name: not running"
    return 1
}

# tail_log FILE [N] : the last N lines of a log, for error messages.
tail_log() {
    local file="$1" n="${2:-40}"
    if [[ -s "$file" ]]; then
        echo "---- last $n lines of $file ----" >&2
        tail -n "$n" "$file" >&2
        echo "----" >&2
    else
        echo "(log $file is empty or missing)" >&2
    fi
}

# usage_die SCRIPT_USAGE : print usage and exit 2.
usage_die() { printf 'usage: %s\n' "$1" >&2; exit 2; }
