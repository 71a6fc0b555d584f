"""The benchmark's bridge to the interop suite's real servers.

    python3 crates/bench/benches/proxy/interop.py start DIR   # prints one JSON line
    python3 crates/bench/benches/proxy/interop.py token DIR   # a new access token
    python3 crates/bench/benches/proxy/interop.py stop DIR

`start` starts tests/interop's OAuth2 server (oidc-provider), Dovecot and
Postfix in DIR (see tests/interop/harness.py), then runs the
authorization-code flow twice for one mailbox with the public client
(access tokens live 60 s): one refresh token for `mailbridge account
import`, one access token for the direct client. It prints the ports, the
CA file and the tokens, or {"skip": "why"} when the servers cannot run
here. `token` runs the flow once more and prints {"access_token": ...}
(the direct client's token for the real-server table, taken just before
it: the one `start` printed has expired by then). `stop` stops whatever
`start` left running.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# crates/bench/benches/proxy -> the repository root.
sys.path.insert(0, str(HERE.parents[3] / "tests" / "interop"))

import harness  # noqa: E402
import test_interop  # noqa: E402

USER = "carol"


def start(d):
    why = harness.missing_prerequisites()
    if why:
        return {"skip": "; ".join(why)}
    stack = harness.Stack(d)
    try:
        stack.start()
    except harness.StackError as e:
        stack.stop()
        return {"skip": str(e)}
    op = stack.oidc_url
    user = harness.address(USER)
    for_mailbridge = test_interop.authorization_code_grant(op, user, test_interop.PUBLIC_CLIENT)
    for_direct = test_interop.authorization_code_grant(op, user, test_interop.PUBLIC_CLIENT)
    return {
        "ports": stack.ports,
        "ca": str(stack.ca),
        "token_url": f"{op}/token",
        "client_id": test_interop.PUBLIC_CLIENT,
        "user": user,
        "refresh_token": for_mailbridge["refresh_token"],
        "access_token": for_direct["access_token"],
    }


def token(d):
    op = harness.Stack(d).oidc_url
    grant = test_interop.authorization_code_grant(op, harness.address(USER), test_interop.PUBLIC_CLIENT)
    return {"access_token": grant["access_token"]}


def main(argv):
    if len(argv) != 3 or argv[1] not in ("start", "stop", "token"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "stop":
        if Path(argv[2]).exists():
            harness.Stack(argv[2]).stop()
        return 0
    if argv[1] == "token":
        print(json.dumps(token(argv[2])))
        return 0
    try:
        out = start(argv[2])
    except Exception as e:  # any failure means: no real-server column
        harness.Stack(argv[2]).stop()
        out = {"skip": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
