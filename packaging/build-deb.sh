#!/usr/bin/env bash
# Builds the Debian package with dpkg-deb (no cargo-deb): the binary, the
# systemd units with ExecStart= at /usr/bin/mailbridge, shell completions
# and man pages generated from the CLI (`mailbridge generate`), the
# configuration as a conffile, and the maintainer scripts in
# packaging/debian/. What the package is (name, maintainer, section,
# dependencies, description, file list and modes) is written here and
# nowhere else; its version, license and one-line summary come from
# Cargo.toml (`cargo metadata`).
#
#   packaging/build-deb.sh               a release build (what to ship):
#                                        cargo build --release, then package
#   packaging/build-deb.sh --dev         the dev-profile binary already built
#                                        (target/debug/mailbridge; CI: the
#                                        one the tests built), nothing
#                                        compiled; fast compression
#   packaging/build-deb.sh --bin PATH    that binary (no build); with or
#                                        without --dev
#
# The binary is stripped as dh_strip does (a dev build goes from 240 MB
# to 40). Needs dpkg-deb (package dpkg), strip and readelf (binutils)
# and, for the shared-library dependencies, dpkg-shlibdeps (dpkg-dev;
# without it, the libc6 dependency is read from the binary's symbol
# versions). Prints the .deb's absolute path:
# ${CARGO_TARGET_DIR:-target}/debian/mailbridge_VERSION-1_ARCH.deb.
set -euo pipefail
umask 022

usage() { echo "usage: $0 [--dev] [--bin PATH]" >&2; }
profile=release
bin=
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) profile=dev ;;
    --bin) [ $# -ge 2 ] || { usage; exit 2; }; bin="$(realpath -e "$2")"; shift ;;
    --bin=*) bin="$(realpath -e "${1#--bin=}")" ;;
    -h|--help) usage; exit 0 ;;
    *) usage; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"

# ---- The package (were [package.metadata.deb] in Cargo.toml) ----
name=mailbridge
revision=1
maintainer="mailbridge developers <mailbridge@invalid>"
copyright="mailbridge developers"
section=mail
priority=optional
# Besides the shared libraries the binary links (computed below):
# adduser for postinst's system user.
depends_fixed=adduser
# The extended description, wrapped at 79 columns (one space is added in
# front of each line in DEBIAN/control).
long_description="\
A local authenticating proxy: mail clients, scanners and printers that only
know passwords log in to it with IMAP, POP3 or SMTP; it logs in to Microsoft
365, Gmail or any OAuth2 mail server with XOAUTH2 or OAUTHBEARER using a sealed
grant, then relays the session."

# ---- Version, license, summary: Cargo.toml's ----
# cargo metadata prints each package as {"name":..,"version":..,"id":..,
# "license":..,"license_file":..,"description":..}; anything else (a
# quote escaped in the description, a changed layout) stops here rather
# than packaging a guess.
meta="$(cargo metadata --no-deps --format-version 1 |
  sed -nE 's/.*\{"name":"'"$name"'","version":"([^"]+)","id":"[^"]*","license":"([^"\\]*)","license_file":(null|"[^"]*"),"description":"([^"\\]+)".*/\1\t\2\t\4/p')"
IFS=$'\t' read -r version license summary <<<"$meta" || true
if [ -z "${version:-}" ] || [ -z "${license:-}" ] || [ -z "${summary:-}" ]; then
  echo "could not read $name's version, license and description from cargo metadata" >&2
  exit 1
fi
# A Cargo pre-release (1.0.0-rc.1) sorts before its release in Debian
# only with a tilde (1.0.0~rc.1).
upstream="${version%%-*}"
[ "$upstream" = "$version" ] || upstream="$upstream~${version#*-}"
deb_version="$upstream-$revision"
arch="$(dpkg --print-architecture)"

# ---- The binary ----
if [ -z "$bin" ]; then
  if [ "$profile" = dev ]; then
    bin="$target/debug/$name"
    if [ ! -x "$bin" ]; then
      echo "$bin does not exist: --dev packages the binary already built (cargo build --bin $name), or name one with --bin" >&2
      exit 1
    fi
  else
    cargo build --locked --release --bin "$name" >&2
    bin="$target/release/$name"
  fi
fi
# A binary of another version would be packaged under the wrong one.
if [ "$("$bin" --version)" != "$name $version" ]; then
  echo "$bin is not $name $version (it says: $("$bin" --version)); rebuild it" >&2
  exit 1
fi

# Reproducible dates: the last commit's (or SOURCE_DATE_EPOCH, if set),
# for the changelog and, through dpkg-deb, the archive's timestamps.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
fi
export SOURCE_DATE_EPOCH

# ---- The tree: packaging/build/root (ignored by git) ----
out=packaging/build
root="$out/root"
rm -rf "$out"
mkdir -p "$root/DEBIAN"
# put SOURCE DESTINATION MODE: DESTINATION is a path in the tree (a
# trailing / keeps SOURCE's name); parents are made 0755.
put() {
  local dest="$root/$2"
  case "$2" in */) dest="$dest$(basename "$1")" ;; esac
  install -D -m "$3" "$1" "$dest"
}

install -d -m 0755 "$root/usr/bin"
# As dh_strip (and cargo-deb before) does: symbols not needed for
# relocation, and the .comment and .note sections.
strip --strip-unneeded --remove-section=.comment --remove-section=.note \
  -o "$root/usr/bin/$name" "$bin"
chmod 0755 "$root/usr/bin/$name"

put packaging/config.toml etc/mailbridge/config.toml 0640

# The units as installed: ExecStart= at /usr/bin/mailbridge.
gen="$out/gen"
mkdir -p "$gen/user" "$gen/man"
sed 's|/usr/local/bin/mailbridge|/usr/bin/mailbridge|g' systemd/mailbridge.service >"$gen/mailbridge.service"
sed 's|%h/.cargo/bin/mailbridge|/usr/bin/mailbridge|g' systemd/user/mailbridge.service >"$gen/user/mailbridge.service"
if grep -q '/usr/local/bin/mailbridge run\|\.cargo/bin/mailbridge run' "$gen"/mailbridge.service "$gen"/user/mailbridge.service; then
  echo "a packaged unit still starts a binary outside /usr/bin" >&2
  exit 1
fi
put "$gen/mailbridge.service" usr/lib/systemd/system/ 0644
put systemd/mailbridge.socket usr/lib/systemd/system/ 0644
put "$gen/user/mailbridge.service" usr/lib/systemd/user/ 0644

# Completions and man pages, generated from the CLI's definition.
"$bin" generate completions bash >"$gen/mailbridge"
"$bin" generate completions zsh >"$gen/_mailbridge"
"$bin" generate completions fish >"$gen/mailbridge.fish"
put "$gen/mailbridge" usr/share/bash-completion/completions/ 0644
put "$gen/_mailbridge" usr/share/zsh/vendor-completions/ 0644
put "$gen/mailbridge.fish" usr/share/fish/vendor_completions.d/ 0644
"$bin" generate man "$gen/man"
gzip -9n "$gen"/man/*.1
for page in "$gen"/man/*.1.gz; do
  put "$page" usr/share/man/man1/ 0644
done

# Documentation: the configuration reference, the README, the copyright
# file (machine-readable format) and a changelog entry for this build.
doc="usr/share/doc/$name"
put config.example.toml "$doc/" 0644
put README.md "$doc/" 0644
cat >"$gen/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: $name
Copyright: $copyright
License: $license
EOF
put "$gen/copyright" "$doc/" 0644
{
  echo "$name ($deb_version) unstable; urgency=medium"
  echo
  echo "  * Built from the repository by packaging/build-deb.sh."
  echo
  echo " -- $maintainer  $(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
} >"$gen/changelog.Debian"
gzip -9n "$gen/changelog.Debian"
put "$gen/changelog.Debian.gz" "$doc/" 0644

# ---- DEBIAN/ ----
# Maintainer scripts.
for script in packaging/debian/*; do
  case "$(basename "$script")" in
    preinst|postinst|prerm|postrm) install -m 0755 "$script" "$root/DEBIAN/" ;;
    *) echo "$script: not a maintainer script this script knows" >&2; exit 1 ;;
  esac
done

# Every file under /etc is a conffile (Debian policy 10.7.2): an
# administrator's edits survive upgrades.
(cd "$root" && find etc -type f | LC_ALL=C sort | sed 's|^|/|') >"$root/DEBIAN/conffiles"
grep -qx /etc/mailbridge/config.toml "$root/DEBIAN/conffiles"

# Checksums of every file but the conffiles (dpkg keeps theirs), as
# dh_md5sums writes them.
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\n' | LC_ALL=C sort |
  grep -vxF -f <(sed 's|^/||' DEBIAN/conffiles) | tr '\n' '\0' | xargs -0 md5sum) >"$root/DEBIAN/md5sums"

# Installed-Size, in KiB, as dpkg-gencontrol counts it: each file's size
# rounded up to a KiB, and 1 for each directory or link.
installed_size="$(find "$root" -mindepth 1 -path "$root/DEBIAN" -prune -o -printf '%y %s\n' |
  awk '$1 == "f" { kib += int(($2 + 1023) / 1024); next } { kib += 1 } END { print kib }')"

# Depends: the shared libraries the binary needs, as cargo-deb's $auto
# computed them: dpkg-shlibdeps over the installed libraries' symbols
# files, without libgcc-s1 (Priority: required, always present).
# Without dpkg-shlibdeps, only libc6's libraries are known: libc6 at
# least the newest GLIBC_ symbol version the binary asks for, and any
# other library stops the build.
packaged_bin="$(realpath "$root/usr/bin/$name")"
shlibdeps="$(command -v dpkg-shlibdeps || true)"
if [ -n "$shlibdeps" ] && [ -x "$shlibdeps" ]; then
  work="$(mktemp -d)"
  mkdir "$work/debian"
  : >"$work/debian/control"
  # (Its warning that the binary is not under debian/ says nothing here.)
  if ! shlibs="$(cd "$work" && "$shlibdeps" -O "$packaged_bin" 2>"$work/stderr")"; then
    cat "$work/stderr" >&2
    rm -rf "$work"
    echo "dpkg-shlibdeps failed" >&2
    exit 1
  fi
  rm -rf "$work"
  shlibs="$(sed -n 's/^shlibs:Depends=//p' <<<"$shlibs" | tr ',' '\n' |
    sed 's/^ *//; s/ *$//' | grep -v '^libgcc' | paste -sd, - | sed 's/,/, /g')"
else
  needed="$(readelf -d -W "$packaged_bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p')"
  for lib in $needed; do
    case "$lib" in
      libc.so.6|libm.so.6|libpthread.so.0|libdl.so.2|librt.so.1|libutil.so.1|libresolv.so.2|ld-linux*.so.*) ;;
      libgcc_s.so.1) ;;
      *) echo "$name needs $lib: install dpkg-dev (dpkg-shlibdeps) to find its package" >&2; exit 1 ;;
    esac
  done
  if ! dpkg-query -W -f '${Status}\n' "libc6:$arch" 2>/dev/null | grep -q 'install ok installed'; then
    echo "libc6:$arch is not this system's C library: install dpkg-dev (dpkg-shlibdeps)" >&2
    exit 1
  fi
  glibc="$(readelf -V -W "$packaged_bin" | grep -o 'Name: GLIBC_[0-9.]*' | sed 's/Name: GLIBC_//' | sort -V | tail -n 1)"
  if [ -z "$glibc" ]; then
    echo "no GLIBC_ symbol version in $packaged_bin" >&2
    exit 1
  fi
  shlibs="libc6 (>= $glibc)"
fi
if [ -z "$shlibs" ]; then
  echo "no shared-library dependency found for $packaged_bin" >&2
  exit 1
fi

{
  echo "Package: $name"
  echo "Version: $deb_version"
  echo "Architecture: $arch"
  echo "Section: $section"
  echo "Priority: $priority"
  echo "Maintainer: $maintainer"
  echo "Installed-Size: $installed_size"
  echo "Depends: $depends_fixed, $shlibs"
  echo "Description: $summary"
  sed 's/^$/./; s/^/ /' <<<"$long_description"
} >"$root/DEBIAN/control"

# ---- The .deb ----
# Owners root:root whoever builds it; xz at dpkg-deb's default level for
# a release, gzip -1 for --dev (CI's, installed and purged at once).
compression=()
[ "$profile" = dev ] && compression=(-Zgzip -z1)
mkdir -p "$target/debian"
deb="$target/debian/${name}_${deb_version}_${arch}.deb"
rm -f "$deb"
dpkg-deb --root-owner-group "${compression[@]}" --build "$root" "$deb" >&2
realpath "$deb"
