#!/usr/bin/env bash
# Install keibi as system services (run as root from a checkout):
#
#   - builds the release binaries (cargo must be on PATH);
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
# Options: --no-build (install binaries already in target/release).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
build=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install.sh: unknown option $arg" >&2
            exit 2
            ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: run as root (it writes /usr/local/bin, /etc/systemd/system and /etc/keibi)" >&2
    exit 1
fi

if [[ $build -eq 1 ]]; then
    if ! command -v cargo >/dev/null; then
        echo "install.sh: cargo not found; install Rust (https://rustup.rs) or use --no-build" >&2
        exit 1
    fi
    (cd "$repo" && cargo build --release --workspace --bins)
fi

for b in keibi-syncd keibi-mountd keibictl; do
    install -D -m 0755 "$repo/target/release/$b" "/usr/local/bin/$b"
done
install -D -m 0644 "$here/keibi-syncd.service" /etc/systemd/system/keibi-syncd.service
install -D -m 0644 "$here/keibi-mountd@.service" /etc/systemd/system/keibi-mountd@.service
install -D -m 0644 "$here/keibi.sysusers" /usr/lib/sysusers.d/keibi.conf
install -d -m 0755 /etc/keibi
if [[ -e /etc/keibi/syncd.toml ]]; then
    install -m 0644 "$here/syncd.toml" /etc/keibi/syncd.toml.example
    echo "kept /etc/keibi/syncd.toml; the current example is /etc/keibi/syncd.toml.example"
else
    install -m 0644 "$here/syncd.toml" /etc/keibi/syncd.toml
fi
install -D -m 0644 "$repo/README.md" /usr/local/share/doc/keibi/README.md

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
