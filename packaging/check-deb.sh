#!/usr/bin/env bash
# Build keibi's Debian package from this tree and check it (run by
# packaging/verify.sh, so by scripts/test.sh):
#
#   - control fields, the conffiles list, the maintainer scripts (mode
#     0755, `sh -n`, none enables or starts a unit);
#   - the exact list of files with their modes and owners;
#   - lintian: no tag that packaging/deb/lintian-overrides does not
#     explain;
#   - installing into a scratch root (dpkg --root with
#     --force-script-chrootless, so the maintainer scripts run against
#     $DPKG_ROOT) creates the keibi user and /run/keibi, /run/keibi-mountd,
#     /var/lib/keibi with their owners and modes, enables nothing, and the
#     installed units pass `systemd-analyze verify`;
#   - remove keeps the configuration and the state; purge removes the
#     configuration but keeps /var/lib/keibi, unless KEIBI_PURGE_STATE=yes.
#
# Usage: packaging/check-deb.sh BIN_DIR   (binaries built by cargo build)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
bin_dir="${1:?usage: check-deb.sh BIN_DIR}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail=0
nbad=0
seen=0
bad() {
    echo "check-deb.sh: $*" >&2
    fail=1
    nbad=$((nbad + 1))
}
# Each check starts with `begin`; its `ok` line shows only if it found
# nothing wrong.
begin() { seen=$nbad; }
ok() { if [[ $nbad -eq $seen ]]; then echo "ok: $*"; fi; }

deb="$(bash "$here/deb.sh" --bin-dir "$bin_dir" --out "$tmp/out" --fast | tail -1)"
[[ -f "$deb" ]] || {
    echo "check-deb.sh: deb.sh did not produce a package" >&2
    exit 1
}
ok "built $(basename "$deb")"

begin
# Control fields.
version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml")"
field() { dpkg-deb -f "$deb" "$1"; }
[[ "$(field Package)" == keibi ]] || bad "Package is '$(field Package)'"
[[ "$(field Version)" == "$version" ]] || bad "Version is '$(field Version)', Cargo.toml says $version"
[[ "$(field Architecture)" == "$(dpkg --print-architecture)" ]] || bad "Architecture is '$(field Architecture)'"
[[ "$(field Depends)" == *libc6* ]] || bad "Depends lacks libc6: '$(field Depends)'"
for f in Maintainer Description Installed-Size Section Priority; do
    [[ -n "$(field "$f")" ]] || bad "control field $f is empty"
done
ok "control: $(field Package) $(field Version) $(field Architecture), Depends: $(field Depends)"

begin
dpkg-deb -e "$deb" "$tmp/control"
[[ "$(cat "$tmp/control/conffiles")" == /etc/keibi/syncd.toml ]] ||
    bad "conffiles is '$(cat "$tmp/control/conffiles")'"
ok "conffiles: $(tr '\n' ' ' <"$tmp/control/conffiles")"
begin
for s in postinst prerm postrm; do
    f="$tmp/control/$s"
    if [[ ! -f "$f" ]]; then
        bad "no $s"
        continue
    fi
    [[ "$(stat -c %a "$f")" == 755 ]] || bad "$s has mode $(stat -c %a "$f")"
    sh -n "$f" || bad "$s: sh -n failed"
    if grep -En '^[^#]*(systemctl[^#]*(enable|start|restart)|deb-systemd-(invoke|helper))' "$f" | grep -v 'systemctl stop'; then
        bad "$s enables or starts something"
    fi
done
ok "maintainer scripts: mode 0755, sh -n, nothing enabled or started"

begin
# Every file, with its mode and owner (a symlink shows its target).
dpkg-deb -c "$deb" | awk '{ p = $6; for (i = 7; i <= NF; i++) p = p " " $i; print $1, $2, p }' |
    grep -v ' \./$' | sed 's| \./| /|; s|/$||' | sort -k3 >"$tmp/contents"
{
    d=drwxr-xr-x
    for dir in /etc /etc/keibi /lib /lib/systemd /lib/systemd/system /usr /usr/bin /usr/lib \
        /usr/lib/sysusers.d /usr/lib/tmpfiles.d /usr/sbin /usr/share /usr/share/bash-completion \
        /usr/share/bash-completion/completions /usr/share/doc /usr/share/doc/keibi \
        /usr/share/fish /usr/share/fish/vendor_completions.d /usr/share/man /usr/share/man/man1 \
        /usr/share/man/man8 /usr/share/zsh /usr/share/zsh/vendor-completions; do
        echo "$d root/root $dir"
    done
    f=-rw-r--r--
    for b in keibi-syncd keibi-mountd keibictl; do
        echo "-rwxr-xr-x root/root /usr/bin/$b"
        echo "$f root/root /usr/share/bash-completion/completions/$b"
        echo "$f root/root /usr/share/zsh/vendor-completions/_$b"
        echo "$f root/root /usr/share/fish/vendor_completions.d/$b.fish"
    done
    echo "lrwxrwxrwx root/root /usr/sbin/mount.fuse.keibi -> ../bin/keibi-mountd"
    for p in /etc/keibi/syncd.toml /lib/systemd/system/keibi-syncd.service \
        /lib/systemd/system/keibi-mountd@.service /usr/lib/sysusers.d/keibi.conf \
        /usr/lib/tmpfiles.d/keibi.conf /usr/share/doc/keibi/README.md \
        /usr/share/doc/keibi/configuration.md \
        /usr/share/doc/keibi/copyright /usr/share/doc/keibi/changelog.gz \
        /usr/share/man/man1/keibictl.1.gz /usr/share/man/man8/keibi-syncd.8.gz \
        /usr/share/man/man8/keibi-mountd.8.gz /usr/share/man/man8/mount.fuse.keibi.8.gz /usr/share/lintian /usr/share/lintian/overrides \
        /usr/share/lintian/overrides/keibi; do
        case "$p" in
            */lintian | */overrides) echo "$d root/root $p" ;;
            *) echo "$f root/root $p" ;;
        esac
    done
} | sort -k3 >"$tmp/expected"
if diff -u "$tmp/expected" "$tmp/contents" >"$tmp/contents.diff"; then
    ok "contents: $(wc -l <"$tmp/contents") entries, modes and owners as expected"
else
    cat "$tmp/contents.diff" >&2
    bad "the package's contents differ from the expected list (- expected, + found)"
fi

begin
# lintian, with the overrides the package itself carries.
if command -v lintian >/dev/null; then
    lintian_out="$(lintian --allow-root --fail-on none "$deb" 2>&1 || true)"
    if [[ -n "$lintian_out" ]]; then
        echo "$lintian_out" >&2
        bad "lintian reports tags that packaging/deb/lintian-overrides does not explain"
    else
        ok "lintian: no tags beyond the explained overrides"
    fi
else
    bad "lintian is not installed (apt-get install lintian)"
fi

begin
# Install into a scratch root.
root="$tmp/root"
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/etc"
: >"$root/var/lib/dpkg/status"
: >"$root/etc/passwd"
: >"$root/etc/group"
dpkg_root() { dpkg --root="$root" --force-script-chrootless --force-depends --log=/dev/null "$@"; }
if ! dpkg_root -i "$deb" >"$tmp/install.log" 2>&1; then
    cat "$tmp/install.log" >&2
    bad "dpkg --root -i failed"
fi
[[ "$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Status}' keibi)" == "install ok installed" ]] ||
    bad "keibi is not 'install ok installed' in the scratch root"
user_line="$(grep '^keibi:' "$root/etc/passwd" || true)"
[[ "$user_line" =~ ^keibi:x:[0-9]+:[0-9]+:.*:/var/lib/keibi:/usr/sbin/nologin$ ]] ||
    bad "postinst did not create the keibi user (passwd line: '$user_line')"
keibi_uid="$(cut -d: -f3 <<<"$user_line")"
keibi_gid="$(cut -d: -f4 <<<"$user_line")"
check_dir() { # path mode uid gid
    local got
    got="$(stat -c '%a %u %g' "$root$1" 2>/dev/null || echo missing)"
    [[ "$got" == "$2 $3 $4" ]] || bad "$1 is '$got', expected '$2 $3 $4'"
}
check_dir /run/keibi 755 "$keibi_uid" "$keibi_gid"
check_dir /run/keibi-mountd 755 0 0
check_dir /var/lib/keibi 700 "$keibi_uid" "$keibi_gid"
[[ "$(readlink -f "$root/usr/sbin/mount.fuse.keibi")" == "$root/usr/bin/keibi-mountd" ]] ||
    bad "mount.fuse.keibi does not lead to keibi-mountd"
for b in keibi-syncd keibi-mountd keibictl; do
    "$root/usr/bin/$b" --version >/dev/null || bad "installed $b --version failed"
done
if [[ -e "$root/etc/systemd/system" ]]; then
    bad "installing enabled something: $(find "$root/etc/systemd/system" | tr '\n' ' ')"
fi
ok "installed in a scratch root: user $user_line; /run/keibi, /run/keibi-mountd, /var/lib/keibi as the units have them; nothing enabled"

begin
# The installed units. verify insists that ExecStart's binary exists, and
# the scratch root has no systemd to verify against (--root would need
# sysinit.target there): the units are copied with /usr/bin/keibi-*
# pointing into the root, and nothing else changed (checked).
mkdir "$tmp/units"
for unit in keibi-syncd.service keibi-mountd@.service; do
    installed="$root/lib/systemd/system/$unit"
    sed "s|/usr/bin/keibi-|$root/usr/bin/keibi-|g" "$installed" >"$tmp/units/$unit"
    changed="$(diff "$installed" "$tmp/units/$unit" | grep '^[<>]' | grep -v '^[<>] ExecStart=' || true)"
    [[ -z "$changed" ]] || bad "rewriting the installed $unit touched more than ExecStart: $changed"
    grep -q "^ExecStart=/usr/bin/" "$installed" || bad "the installed $unit does not run a binary from /usr/bin"
done
if out="$(systemd-analyze verify "$tmp/units/keibi-syncd.service" "$tmp/units/keibi-mountd@mnt-keibi.service" 2>&1)" &&
    [[ -z "$out" ]]; then
    ok "systemd-analyze verify: the installed keibi-syncd.service, keibi-mountd@mnt-keibi.service"
else
    echo "$out" >&2
    bad "systemd-analyze verify of the installed units"
fi

begin
# Remove and purge.
echo share >"$root/var/lib/keibi/marker"
dpkg_root -r keibi >"$tmp/remove.log" 2>&1 || {
    cat "$tmp/remove.log" >&2
    bad "dpkg -r failed"
}
[[ ! -e "$root/usr/bin/keibi-syncd" && -f "$root/etc/keibi/syncd.toml" && -f "$root/var/lib/keibi/marker" ]] ||
    bad "remove: binaries must go, /etc/keibi/syncd.toml and /var/lib/keibi must stay"
dpkg_root -P keibi >"$tmp/purge.log" 2>&1 || {
    cat "$tmp/purge.log" >&2
    bad "dpkg -P failed"
}
[[ ! -e "$root/etc/keibi/syncd.toml" && -f "$root/var/lib/keibi/marker" ]] ||
    bad "purge without KEIBI_PURGE_STATE must remove the conffile and keep /var/lib/keibi"
grep -q 'kept /var/lib/keibi' "$tmp/purge.log" || bad "purge did not say that it kept /var/lib/keibi"
dpkg_root -i "$deb" >"$tmp/install2.log" 2>&1 || bad "second install failed"
KEIBI_PURGE_STATE=yes dpkg_root -P keibi >"$tmp/purge2.log" 2>&1 || bad "dpkg -P (KEIBI_PURGE_STATE=yes) failed"
[[ ! -e "$root/var/lib/keibi" ]] || bad "purge with KEIBI_PURGE_STATE=yes kept /var/lib/keibi"
grep -q '^keibi:' "$root/etc/passwd" || bad "purge removed the keibi user (it is kept)"
ok "remove keeps config and state; purge keeps state unless KEIBI_PURGE_STATE=yes; the user stays"

if [[ $fail -ne 0 ]]; then
    echo "check-deb.sh: FAILED" >&2
    exit 1
fi
echo "check-deb.sh: the package passed"
