#!/usr/bin/env bash
# Build keibi's Debian package with dpkg-deb (no debhelper, no cargo-deb):
#
#   bash packaging/deb.sh                 # release build, then the package
#   bash packaging/deb.sh --bin-dir DIR   # package binaries already built in DIR
#
# The package, keibi_<version>_<arch>.deb (version from Cargo.toml), is
# written to --out DIR (default: target/deb). It installs:
#
#   /usr/bin/keibi-syncd, keibi-mountd, keibictl       (stripped copies)
#   /usr/sbin/mount.fuse.keibi -> ../bin/keibi-mountd (mount -t fuse.keibi)
#   /lib/systemd/system/keibi-syncd.service, keibi-mountd@.service
#                                 (packaging/'s units, /usr/local -> /usr)
#   /usr/lib/sysusers.d/keibi.conf       (the keibi user, keibi.sysusers)
#   /usr/lib/tmpfiles.d/keibi.conf       (/run/keibi, /run/keibi-mountd,
#                                         /var/lib/keibi with their owners)
#   /etc/keibi/syncd.toml                (conffile: the example config)
#   /usr/share/doc/keibi/                (README.md, configuration.md, copyright, changelog.gz)
#   /usr/share/man/man1, man8            (man pages of the three binaries
#                                         and of mount.fuse.keibi)
#   /usr/share/bash-completion, zsh, fish completions
#   /usr/share/lintian/overrides/keibi   (the lintian tags it explains)
#
# The maintainer scripts (packaging/deb/) create the user and directories,
# enable and start nothing, stop the services on removal, and remove the
# state directory on purge only with KEIBI_PURGE_STATE=yes.
#
# Options:
#   --bin-dir DIR   take the binaries from DIR instead of building them
#   --out DIR       where to write the .deb (created)
#   --fast          gzip -1 instead of xz (for tests)
# Prints the path of the package on its last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
bin_dir=""
out="$repo/target/deb"
compress=(-Zxz)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bin-dir | --out)
            if [[ $# -lt 2 || -z "$2" ]]; then
                echo "deb.sh: $1 needs a directory" >&2
                exit 2
            fi
            if [[ "$1" == --bin-dir ]]; then bin_dir="$2"; else out="$2"; fi
            shift
            ;;
        --fast) compress=(-Zgzip -z1) ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "deb.sh: unknown option $1" >&2
            exit 2
            ;;
    esac
    shift
done

for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
    if ! command -v "$tool" >/dev/null; then
        echo "deb.sh: $tool is required (apt-get install dpkg-dev binutils gzip)" >&2
        exit 1
    fi
done

if [[ -z "$bin_dir" ]]; then
    (cd "$repo" && cargo build --release --workspace --bins)
    bin_dir="$repo/target/release"
fi
for b in keibi-syncd keibi-mountd keibictl; do
    if [[ ! -x "$bin_dir/$b" ]]; then
        echo "deb.sh: $bin_dir/$b is missing (build it: cargo build --release --workspace --bins)" >&2
        exit 1
    fi
done

version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")"
arch="$(dpkg --print-architecture)"
if [[ -z "$version" ]]; then
    echo "deb.sh: no version in Cargo.toml's [workspace.package]" >&2
    exit 1
fi
# Reproducible dates: the last commit's, else now.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
umask 022

# Binaries.
install -d "$root/usr/bin" "$root/usr/sbin"
for b in keibi-syncd keibi-mountd keibictl; do
    install -m 0755 "$bin_dir/$b" "$root/usr/bin/$b"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/$b"
done
ln -s ../bin/keibi-mountd "$root/usr/sbin/mount.fuse.keibi"

# Units: the same files install.sh installs, with /usr instead of /usr/local.
install -d "$root/lib/systemd/system"
for unit in keibi-syncd.service keibi-mountd@.service; do
    sed -e 's|/usr/local/bin/|/usr/bin/|g' -e 's|/usr/local/share/doc/|/usr/share/doc/|g' \
        "$here/$unit" >"$root/lib/systemd/system/$unit"
    chmod 0644 "$root/lib/systemd/system/$unit"
done
install -D -m 0644 "$here/keibi.sysusers" "$root/usr/lib/sysusers.d/keibi.conf"
install -D -m 0644 "$here/deb/keibi.tmpfiles" "$root/usr/lib/tmpfiles.d/keibi.conf"
install -D -m 0644 "$here/syncd.toml" "$root/etc/keibi/syncd.toml"

# Documentation.
doc="$root/usr/share/doc/keibi"
install -D -m 0644 "$repo/README.md" "$doc/README.md"
install -m 0644 "$repo/docs/configuration.md" "$doc/configuration.md"
install -m 0644 "$here/deb/copyright" "$doc/copyright"
{
    printf 'keibi (%s) unstable; urgency=medium\n\n' "$version"
    printf '  * Release %s, built from %s.\n\n' "$version" \
        "$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo 'a source tree')"
    printf ' -- keibi developers <keibi@example.invalid>  %s\n' \
        "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"
# The lintian tags this package knowingly triggers, each with its reason.
install -D -m 0644 "$here/deb/lintian-overrides" "$root/usr/share/lintian/overrides/keibi"

# Man pages and shell completions, generated by the binaries themselves.
gen="$tmp/gen"
for b in keibi-syncd keibi-mountd keibictl; do
    "$bin_dir/$b" --generate-docs "$gen"
done
for page in "$gen"/man/*.[18]; do
    section="${page##*.}"
    install -d "$root/usr/share/man/man$section"
    gzip -9n <"$page" >"$root/usr/share/man/man$section/$(basename "$page").gz"
    chmod 0644 "$root/usr/share/man/man$section/$(basename "$page").gz"
done
install -d "$root/usr/share/bash-completion/completions" \
    "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
for b in keibi-syncd keibi-mountd keibictl; do
    install -m 0644 "$gen/bash/$b" "$root/usr/share/bash-completion/completions/$b"
    install -m 0644 "$gen/zsh/_$b" "$root/usr/share/zsh/vendor-completions/_$b"
    install -m 0644 "$gen/fish/$b.fish" "$root/usr/share/fish/vendor_completions.d/$b.fish"
done

# Control area.
install -d -m 0755 "$root/DEBIAN"
for s in postinst prerm postrm; do
    install -m 0755 "$here/deb/$s" "$root/DEBIAN/$s"
done
echo /etc/keibi/syncd.toml >"$root/DEBIAN/conffiles"
chmod 0644 "$root/DEBIAN/conffiles"

# Library dependencies, as dpkg-shlibdeps finds them (it wants a
# debian/control in its working directory).
mkdir -p "$tmp/shlibs/debian"
printf 'Source: keibi\n\nPackage: keibi\nArchitecture: any\n' >"$tmp/shlibs/debian/control"
depends="$(cd "$tmp/shlibs" && dpkg-shlibdeps -O "${root}/usr/bin/keibi-syncd" \
    "${root}/usr/bin/keibi-mountd" "${root}/usr/bin/keibictl" 2>/dev/null |
    sed -n 's/^shlibs:Depends=//p')"
if [[ -z "$depends" ]]; then
    echo "deb.sh: dpkg-shlibdeps found no dependencies" >&2
    exit 1
fi
installed_size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"

cat >"$root/DEBIAN/control" <<CONTROL
Package: keibi
Version: $version
Architecture: $arch
Maintainer: keibi developers <keibi@example.invalid>
Installed-Size: $installed_size
Depends: $depends
Recommends: systemd
Section: net
Priority: optional
Homepage: https://example.invalid/keibi
Description: encrypted peer-to-peer shared folder (FUSE)
 keibi shares one folder between machines, end-to-end encrypted. Each
 machine mounts the share with FUSE and uses it as a local disk.
 .
 keibi-syncd (an unprivileged service, user keibi) owns the store and
 talks to peers; keibi-mountd (root, one per mountpoint) serves the
 mount; keibictl is the command-line client. Nothing is enabled or
 started on installation.
CONTROL
chmod 0644 "$root/DEBIAN/control"

mkdir -p "$out"
deb="$(cd "$out" && pwd)/keibi_${version}_${arch}.deb"
# Owners root:root whoever builds it.
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >/dev/null
echo "$deb"
