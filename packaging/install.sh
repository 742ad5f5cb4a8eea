#!/usr/bin/env bash
# Install keibi as system services (run as root from a checkout):
#
#   - builds the release binaries with cargo, found on PATH, in $CARGO,
#     ~/.cargo/bin or $CARGO_HOME/bin; under sudo (whose secure_path hides a
#     rustup cargo) also in the invoking user's ~/.cargo/bin, and then the
#     build runs as that user, so the checkout gets no root-owned files;
#   - installs keibi-syncd, keibi-mountd and keibictl to /usr/local/bin;
#   - installs keibi-syncd.service and keibi-mountd@.service to
#     /etc/systemd/system;
#   - installs the example configuration as /etc/keibi/syncd.toml (an
#     existing one is kept; the new example goes next to it as
#     syncd.toml.example);
#   - creates the keibi user and group if missing (systemd-sysusers with
#     keibi.sysusers, or useradd when sysusers is not available);
#   - reloads systemd when it is running.
#
# It does not enable or start anything. Afterwards:
#
#   systemctl enable --now keibi-syncd.service
#   systemctl enable --now "keibi-mountd@$(systemd-escape --path /mnt/keibi).service"
#
# Options:
#   --no-build       install binaries already in target/release
#   --bin-dir DIR    install the binaries in DIR (implies --no-build)
#   --destdir DIR    stage the installation under DIR (for packaging): every
#                    path above is prefixed with DIR, and nothing outside it
#                    is touched (no user is created, systemd is not
#                    reloaded); works without root if DIR is writable
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
# shellcheck source=scripts/lib/packages.sh
. "$repo/scripts/lib/packages.sh"
build=1
bin_dir="$repo/target/release"
destdir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-build) build=0 ;;
        --bin-dir | --destdir)
            if [[ $# -lt 2 || -z "$2" ]]; then
                echo "install.sh: $1 needs a directory" >&2
                exit 2
            fi
            if [[ "$1" == --bin-dir ]]; then
                bin_dir="$2"
                build=0
            else
                destdir="$(realpath -m "$2")"
            fi
            shift
            ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install.sh: unknown option $1" >&2
            exit 2
            ;;
    esac
    shift
done

if [[ -z "$destdir" && $(id -u) -ne 0 ]]; then
    echo "install.sh: run as root (it writes /usr/local/bin, /etc/systemd/system and /etc/keibi), or stage with --destdir DIR" >&2
    exit 1
fi

no_cargo() {
    cat >&2 <<'MSG'
install.sh: cargo not found. Looked at $CARGO, PATH, ~/.cargo/bin,
$CARGO_HOME/bin and, under sudo, the invoking user's ~/.cargo/bin.
Either install Rust (https://rustup.rs), or build first as yourself and
install what you built:
    cargo build --release --workspace --bins
    sudo packaging/install.sh --no-build
or name your cargo explicitly:
    sudo env "CARGO=$(command -v cargo)" packaging/install.sh
MSG
    exit 1
}

if [[ $build -eq 1 ]]; then
    if locate_cargo; then
        echo "== building with $KEIBI_CARGO"
        (cd "$repo" && "$KEIBI_CARGO" build --release --workspace --bins)
    elif [[ $(id -u) -eq 0 ]] && invoker_cargo; then
        # sudo hid the invoking user's rustup cargo: build as that user,
        # with their HOME (where rustup keeps its toolchains).
        echo "== building as $KEIBI_CARGO_USER with $KEIBI_CARGO"
        if ! (cd "$repo" && setpriv --reuid="$KEIBI_CARGO_USER" \
            --regid="$(id -g "$KEIBI_CARGO_USER")" --init-groups \
            env HOME="$KEIBI_CARGO_HOME" USER="$KEIBI_CARGO_USER" \
            PATH="$KEIBI_CARGO_HOME/.cargo/bin:/usr/local/bin:/usr/bin:/bin" \
            "$KEIBI_CARGO" build --release --workspace --bins); then
            echo "install.sh: the build as $KEIBI_CARGO_USER failed; if target/ holds files of another user, build yourself (cargo build --release --workspace --bins) and run: sudo packaging/install.sh --no-build" >&2
            exit 1
        fi
    else
        no_cargo
    fi
fi

for b in keibi-syncd keibi-mountd keibictl; do
    if [[ ! -x "$bin_dir/$b" ]]; then
        echo "install.sh: $bin_dir/$b is missing (build it: cargo build --release --workspace --bins)" >&2
        exit 1
    fi
done

for b in keibi-syncd keibi-mountd keibictl; do
    install -D -m 0755 "$bin_dir/$b" "$destdir/usr/local/bin/$b"
done
install -D -m 0644 "$here/keibi-syncd.service" "$destdir/etc/systemd/system/keibi-syncd.service"
install -D -m 0644 "$here/keibi-mountd@.service" "$destdir/etc/systemd/system/keibi-mountd@.service"
install -D -m 0644 "$here/keibi.sysusers" "$destdir/usr/lib/sysusers.d/keibi.conf"
install -d -m 0755 "$destdir/etc/keibi"
if [[ -e "$destdir/etc/keibi/syncd.toml" ]]; then
    install -m 0644 "$here/syncd.toml" "$destdir/etc/keibi/syncd.toml.example"
    echo "kept $destdir/etc/keibi/syncd.toml; the current example is $destdir/etc/keibi/syncd.toml.example"
else
    install -m 0644 "$here/syncd.toml" "$destdir/etc/keibi/syncd.toml"
fi
install -D -m 0644 "$repo/README.md" "$destdir/usr/local/share/doc/keibi/README.md"
install -m 0644 "$repo/docs/configuration.md" "$destdir/usr/local/share/doc/keibi/configuration.md"

if [[ -n "$destdir" ]]; then
    cat <<MSG
keibi staged under $destdir. On the target system, create the keibi user
(systemd-sysusers /usr/lib/sysusers.d/keibi.conf) and run
systemctl daemon-reload.
MSG
    exit 0
fi

if ! getent passwd keibi >/dev/null; then
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers /usr/lib/sysusers.d/keibi.conf
    else
        getent group keibi >/dev/null || groupadd --system keibi
        useradd --system --gid keibi --home-dir /var/lib/keibi --no-create-home \
            --shell /usr/sbin/nologin --comment "keibi sync daemon" keibi
    fi
fi
echo "user: $(getent passwd keibi)"

if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
fi

cat <<'MSG'
keibi installed. Start it with:
  systemctl enable --now keibi-syncd.service
  systemctl enable --now "keibi-mountd@$(systemd-escape --path /mnt/keibi).service"
Status:   keibictl status      (as root or a member of the control socket's group)
MSG
