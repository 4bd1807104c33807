#!/usr/bin/env bash
# Install what the local services need on a fresh Debian machine (run as root; idempotent):
# redis-server, prometheus and prometheus-alertmanager from Debian when missing, then the Kafka
# broker jars from Maven Central (deploy/local/kafka.sh fetch; needs java >= 17 and mvn).
# Also checks for the Rust toolchain that `pip install` builds the native fast paths with
# (native/, cargo >= 1.77; rustup's ~/.cargo/bin counts; Debian's cargo when there is none).
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

# the native extension (native/Cargo.toml): rustup's toolchain, else Debian's cargo
RUST_MIN=1.77
[[ -x "$HOME/.cargo/bin/cargo" ]] && export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
    ((EUID == 0)) && command -v apt-get >/dev/null ||
        die "no cargo: install Rust >= $RUST_MIN (https://rustup.rs) to build native/"
    log "installing Debian's cargo (for native/)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends cargo ||
        die "apt-get install cargo failed: install Rust >= $RUST_MIN (https://rustup.rs)"
fi
rustc_version="$(rustc --version 2>/dev/null | sed -nE 's/^rustc ([0-9]+\.[0-9]+).*/\1/p')"
[[ -n "$rustc_version" ]] && printf '%s\n%s\n' "$RUST_MIN" "$rustc_version" | sort -V -C ||
    die "native/ needs Rust >= $RUST_MIN (found: ${rustc_version:-none}); install it with rustup (https://rustup.rs)"
log "cargo $(cargo --version | cut -d' ' -f2) builds native/"

"$HERE/kafka.sh" fetch
