# shellcheck shell=bash
# Installing what a script needs, and only what is missing.
#
#   require_root "what for"
#   need_command CMD PACKAGE    # queue PACKAGE when CMD is not on PATH
#   need_package PACKAGE        # queue PACKAGE when dpkg does not have it
#   install_needed              # one `apt-get update` + `apt-get install -y`,
#                               # only when something is queued
#   find_cargo                  # make `cargo` runnable (see locate_cargo);
#                               # fail with instructions when there is none
#   locate_cargo                # find cargo: $CARGO, PATH, $HOME/.cargo/bin,
#                               # $CARGO_HOME/bin; put its directory on PATH
#                               # and set KEIBI_CARGO; status 1 if none
#   invoker_cargo               # under sudo: the invoking user's rustup
#                               # cargo ($SUDO_USER's ~/.cargo/bin/cargo,
#                               # hidden by sudo's secure_path); sets
#                               # KEIBI_CARGO, KEIBI_CARGO_USER and
#                               # KEIBI_CARGO_HOME; status 1 if none

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

locate_cargo() {
    local c
    for c in "${CARGO:-}" "$(command -v cargo 2>/dev/null || true)" \
        "${HOME:-/nonexistent}/.cargo/bin/cargo" "${CARGO_HOME:-/nonexistent}/bin/cargo"; do
        if [[ -n "$c" && -x "$c" && ! -d "$c" ]]; then
            KEIBI_CARGO="$c"
            case ":$PATH:" in
                *":$(dirname "$c"):"*) ;;
                *) export PATH="$(dirname "$c"):$PATH" ;;
            esac
            return 0
        fi
    done
    return 1
}

invoker_cargo() {
    local home
    [[ -n "${SUDO_USER:-}" ]] || return 1
    home="$(getent passwd "$SUDO_USER" | cut -d: -f6)"
    [[ -n "$home" && -x "$home/.cargo/bin/cargo" ]] || return 1
    KEIBI_CARGO="$home/.cargo/bin/cargo"
    KEIBI_CARGO_USER="$SUDO_USER"
    KEIBI_CARGO_HOME="$home"
}

find_cargo() {
    if locate_cargo; then
        return 0
    fi
    cat >&2 <<'MSG'
cargo not found (looked at $CARGO, PATH, ~/.cargo/bin and $CARGO_HOME/bin).
keibi is built with Rust 1.95 or newer; install it with rustup:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . "$HOME/.cargo/env"
then run this script again. Under sudo, PATH and HOME are root's (sudo's
secure_path), so a cargo installed with rustup by your own user is not
seen: install Rust for root as above, or run the script from a root shell
that has it (sudo -i).
MSG
    exit 1
}
