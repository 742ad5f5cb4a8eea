# shellcheck shell=bash
# Installing what a script needs, and only what is missing.
#
#   require_root "what for"
#   need_command CMD PACKAGE    # queue PACKAGE when CMD is not on PATH
#   need_package PACKAGE        # queue PACKAGE when dpkg does not have it
#   install_needed              # one `apt-get update` + `apt-get install -y`,
#                               # only when something is queued
#   find_cargo                  # put ~/.cargo/bin on PATH if needed; fail
#                               # with instructions when there is no cargo

_keibi_missing_packages=()

require_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "$(basename "$0"): must run as root ($1)" >&2
        exit 1
    fi
}

_queue_package() {
    local p
    for p in "${_keibi_missing_packages[@]}"; do
        [[ "$p" == "$1" ]] && return 0
    done
    _keibi_missing_packages+=("$1")
}

need_command() {
    command -v "$1" >/dev/null 2>&1 || _queue_package "$2"
}

need_package() {
    if [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" != "install ok installed" ]]; then
        _queue_package "$1"
    fi
}

install_needed() {
    if [[ ${#_keibi_missing_packages[@]} -eq 0 ]]; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$(basename "$0"): missing packages: ${_keibi_missing_packages[*]} (and no apt-get to install them)" >&2
        exit 1
    fi
    echo "== installing: ${_keibi_missing_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${_keibi_missing_packages[@]}"
    _keibi_missing_packages=()
}

find_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
        export PATH="${HOME:-/root}/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        cat >&2 <<'MSG'
cargo not found. keibi is built with Rust 1.95 or newer; install it with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . "$HOME/.cargo/env"
then run this script again.
MSG
        exit 1
    fi
}
