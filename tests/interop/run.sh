#!/usr/bin/env bash
# mailbridge's interop suite: real Dovecot (IMAP, POP3, LMTP), Postfix
# (submission, SASL through Dovecot) and a real OAuth2 server
# (oidc-provider on Node.js), with curl, Python's imaplib/poplib/smtplib,
# fetchmail and mutt logging in through mailbridge, and haproxy in front
# of it sending the PROXY protocol header.
#
#   tests/interop/run.sh [--keep] [-k SUBSTRING] ...   (test_interop.py options)
#
# Needs root, the Debian packages dovecot-imapd dovecot-pop3d dovecot-lmtpd
# postfix fetchmail mutt curl openssl haproxy, Node.js >= 20 with npm, and
# python3. Servers listen on 127.0.0.1 high ports and live in a temporary
# directory under /tmp; everything started is stopped on exit. Under CI=true
# a suite that cannot start fails; elsewhere it says why it skipped.
# The last line of output is "N passed, M failed".
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${MAILBRIDGE_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/mailbridge}"

# The OAuth2 server's packages, exactly as package-lock.json pins them.
if [ ! -d "$here/oidc/node_modules/oidc-provider" ] && command -v npm >/dev/null 2>&1; then
  echo "interop: npm ci (tests/interop/oidc)"
  (cd "$here/oidc" && timeout 300 npm ci --no-audit --no-fund --loglevel=error) \
    || echo "interop: npm ci failed" >&2
fi

# The binary under test (cargo test has usually built it already).
if [ ! -x "$bin" ] && [ -z "${MAILBRIDGE_BIN:-}" ] && command -v cargo >/dev/null 2>&1; then
  echo "interop: cargo build"
  (cd "$repo" && cargo build --locked --quiet) || echo "interop: cargo build failed" >&2
fi

work="$(mktemp -d /tmp/mailbridge-interop.XXXXXX)"
# Safety net: whatever happens to the driver, stop every server it started
# (pid files in $work). The driver removes $work itself after a clean run
# and keeps it, with the servers' logs, after a failure.
cleanup() {
  python3 "$here/harness.py" stop "$work" >/dev/null 2>&1 || true
  rmdir "$work" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 "$here/test_interop.py" --bin "$bin" --dir "$work" "$@"
