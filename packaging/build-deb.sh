#!/usr/bin/env bash
# Builds the Debian package with cargo-deb ([package.metadata.deb] in
# Cargo.toml): the binary, the systemd units with ExecStart= at
# /usr/bin/mailbridge, shell completions and man pages generated from the
# CLI (`mailbridge generate`), the configuration as a conffile, and the
# maintainer scripts in packaging/debian/.
#
#   packaging/build-deb.sh            release build (what to ship)
#   packaging/build-deb.sh --dev      the dev-profile binary (CI: the one
#                                     the tests built; no second build)
#
# Needs cargo-deb (cargo install cargo-deb --locked). Prints the .deb's path.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
case "${1:-}" in
  --dev) profile=dev ;;
  "") ;;
  *) echo "usage: $0 [--dev]" >&2; exit 2 ;;
esac
dir=$([ "$profile" = dev ] && echo debug || echo release)
target="${CARGO_TARGET_DIR:-target}"

cargo build --locked --profile "$profile" --bin mailbridge
bin="$target/$dir/mailbridge"

# What the package installs besides the binary, made from the repository.
out=packaging/build
rm -rf "$out"
mkdir -p "$out/units/user" "$out/completions" "$out/man"
sed 's|/usr/local/bin/mailbridge|/usr/bin/mailbridge|g' systemd/mailbridge.service >"$out/units/mailbridge.service"
cp systemd/mailbridge.socket "$out/units/mailbridge.socket"
sed 's|%h/.cargo/bin/mailbridge|/usr/bin/mailbridge|g' systemd/user/mailbridge.service >"$out/units/user/mailbridge.service"
if grep -q '/usr/local/bin/mailbridge run\|\.cargo/bin/mailbridge run' "$out"/units/*.service "$out"/units/user/*.service; then
  echo "a packaged unit still starts a binary outside /usr/bin" >&2
  exit 1
fi
"$bin" generate completions bash >"$out/completions/mailbridge"
"$bin" generate completions zsh >"$out/completions/_mailbridge"
"$bin" generate completions fish >"$out/completions/mailbridge.fish"
"$bin" generate man "$out/man"
gzip -9n "$out"/man/*.1

# The binary the assets name is target/release/mailbridge; cargo-deb reads
# it from the profile's directory (--profile) without building again.
# (cargo-deb 3.8 warns that a dev profile is meant for tests only: CI's
# package is one; its 190 MB of debug information are stripped and the
# compression is the fast one, which keeps it to seconds.) Its last line
# of output is the package's path.
options=()
[ "$profile" = dev ] && options=(--strip --fast)
cargo deb --no-build --locked --profile "$profile" "${options[@]}" >"$out/cargo-deb.out"
deb="$(tail -n 1 "$out/cargo-deb.out")"
if [ ! -f "$deb" ]; then
  cat "$out/cargo-deb.out" >&2
  echo "cargo deb made no package" >&2
  exit 1
fi
echo "$deb"
