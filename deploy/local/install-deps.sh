#!/usr/bin/env bash
# Install what the local services need on a fresh Debian machine (run as root; idempotent):
# redis-server, prometheus and prometheus-alertmanager from Debian when missing, then the Kafka
# broker jars from Maven Central (deploy/local/kafka.sh fetch; needs java >= 17 and mvn).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/local/common.sh
source "$HERE/common.sh"

# command -> Debian package providing it
declare -A packages=(
    [redis-server]=redis-server
    [prometheus]=prometheus
    [prometheus-alertmanager]=prometheus-alertmanager
    [java]=openjdk-17-jre-headless
    [mvn]=maven
)
missing=()
for cmd in redis-server prometheus prometheus-alertmanager java mvn; do
    command -v "$cmd" >/dev/null || missing+=("${packages[$cmd]}")
done

if ((${#missing[@]})); then
    ((EUID == 0)) || die "missing packages (${missing[*]}); run this script as root"
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        die "apt-get install ${missing[*]} failed"
else
    log "redis-server, prometheus, prometheus-alertmanager, java and mvn are present"
fi

java_major="$(java -version 2>&1 | sed -nE 's/.*version "([0-9]+).*/\1/p' | head -n 1)"
[[ -n "$java_major" && "$java_major" -ge 17 ]] ||
    die "Kafka 4.x needs Java >= 17 (found: ${java_major:-none}); apt-get install -y openjdk-17-jre-headless"

"$HERE/kafka.sh" fetch
