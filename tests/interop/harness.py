"""The interop suite's servers: a real OAuth2 server (oidc-provider on
Node.js), Dovecot (IMAP, POP3, LMTP, SASL for Postfix) and Postfix
(submission), all on 127.0.0.1 high ports from a temporary directory, plus
mailbridge in front of them.

Used by test_interop.py. Also a command line, for run.sh's safety net and
for poking at the stack by hand:

    python3 harness.py check            # can the stack start here? (why not)
    python3 harness.py start DIR        # start the servers, print ports
    python3 harness.py stop DIR         # stop whatever was started in DIR

Every wait is bounded; every process started is recorded in DIR/pids and
stopped by stop().
"""

import json
import os
import pwd
import re
import grp
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# Mailboxes served by Dovecot; each has a password at the OAuth2 server's
# login page (see oidc/server.mjs) and a local password for mailbridge.
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
DOMAIN = "example.test"
# An internationalized address Postfix takes (and discards: see main.cf).
UTF8_ADDRESS = "j\u00f6rg@example.test"


def address(name):
    return f"{name}@{DOMAIN}"


def idp_password(name):
    return f"{name}-idp-password"


def local_password(name):
    # Spaces and quotes: clients must quote it properly.
    return f'{name} "local" pass'


START_TIMEOUT = 30.0


class StackError(Exception):
    """The stack could not start; the message says why."""


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=START_TIMEOUT, proc=None, what="server", log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with status {proc.returncode}{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s{tail(log)}")


def wait_path(path, timeout=START_TIMEOUT, what="socket", log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(path).exists():
            return
        time.sleep(0.05)
    raise StackError(f"{what} {path} did not appear within {timeout:.0f}s{tail(log)}")


def tail(log, n=25):
    if not log:
        return ""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ""
    return "\n  " + "\n  ".join(lines) if lines else ""


def run(cmd, timeout=60, check=True, **kw):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, **kw)
    except subprocess.TimeoutExpired:
        raise StackError(f"{' '.join(map(str, cmd))} timed out after {timeout}s") from None
    if check and p.returncode != 0:
        raise StackError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def run_daemon(cmd, out, timeout=60):
    """Runs a command that daemonizes: its output goes to a file (the
    daemon keeps the descriptors), and its exit status is returned."""
    with open(out, "ab") as f:
        try:
            return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout}s"


def render(template, dest, values):
    text = Path(template).read_text()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    left = [m for line in text.splitlines() if not line.lstrip().startswith("#")
            for m in re.findall(r"@[A-Z_]+@", line)]
    if left:
        raise StackError(f"unrendered placeholders in {template}: {sorted(set(left))}")
    Path(dest).write_text(text, encoding="utf-8")


def find_exe(name, extra=()):
    for d in extra:
        p = Path(d) / name
        if p.exists():
            return str(p)
    return shutil.which(name)


def missing_prerequisites():
    """Why the stack cannot start here, as a list of plain sentences."""
    why = []
    if os.name != "posix":
        return ["not a POSIX system"]
    if os.geteuid() != 0:
        why.append("not running as root (Postfix's master and Dovecot's privilege separation need root)")
    for exe, pkg in [("dovecot", "dovecot-imapd dovecot-pop3d dovecot-lmtpd"),
                     ("postfix", "postfix"), ("node", "nodejs"), ("openssl", "openssl"),
                     ("curl", "curl"), ("fetchmail", "fetchmail"), ("mutt", "mutt"),
                     ("haproxy", "haproxy")]:
        if not find_exe(exe, ["/usr/sbin", "/usr/bin"]):
            why.append(f"`{exe}` is not installed (Debian: apt-get install {pkg})")
    node = find_exe("node", ["/usr/bin"])
    if node:
        try:
            v = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=20).stdout
            major = int(v.strip().lstrip("v").split(".")[0])
        except (OSError, ValueError, subprocess.TimeoutExpired):
            major = 0
        if major < 20:
            why.append(f"Node.js {v.strip() or '?'} is too old for oidc-provider 9 (needs 20 or later)")
    for mod, pkg in [("imap", "dovecot-imapd"), ("pop3", "dovecot-pop3d"), ("lmtp", "dovecot-lmtpd")]:
        if find_exe("dovecot", ["/usr/sbin"]) and not Path(f"/usr/lib/dovecot/{mod}").exists():
            why.append(f"Dovecot's {mod} service is missing (apt-get install {pkg})")
    for user in ["dovecot", "dovenull", "postfix", "mail"]:
        try:
            pwd.getpwnam(user)
        except KeyError:
            why.append(f"system user `{user}` does not exist (created by the Debian packages)")
    for group in ["postdrop"]:
        try:
            grp.getgrnam(group)
        except KeyError:
            why.append(f"system group `{group}` does not exist (created by the postfix package)")
    if not (HERE / "oidc" / "node_modules" / "oidc-provider").exists():
        why.append("the OAuth2 server's packages are not installed (npm ci --prefix tests/interop/oidc)")
    return why


class Stack:
    """The servers of one suite run, living in `dir`."""

    def __init__(self, dir):
        self.dir = Path(dir)
        self.state_file = self.dir / "stack.json"
        self.ports = {}
        self.pids = {}
        if self.state_file.exists():
            st = json.loads(self.state_file.read_text())
            self.ports, self.pids = st["ports"], st["pids"]

    def save(self):
        self.state_file.write_text(json.dumps({"ports": self.ports, "pids": self.pids}))

    # -- paths ------------------------------------------------------------
    @property
    def ca(self):
        return self.dir / "tls" / "ca.pem"

    @property
    def oidc_url(self):
        return f"http://127.0.0.1:{self.ports['oidc']}"

    def maildir(self, name):
        return self.dir / "mail" / DOMAIN / name / "Maildir"

    # -- start --------------------------------------------------------------
    def start(self):
        why = missing_prerequisites()
        if why:
            raise StackError("; ".join(why))
        self.dir.mkdir(parents=True, exist_ok=True)
        # Dovecot's and Postfix's unprivileged processes walk into it.
        os.chmod(self.dir, 0o755)
        for k in ["oidc", "imap", "imaps", "pop3", "pop3s", "submission", "submissions"]:
            self.ports[k] = free_port()
        self.save()
        self.certificates()
        self.start_oidc()
        self.start_dovecot()
        self.start_postfix()
        self.save()

    def certificates(self):
        d = self.dir / "tls"
        d.mkdir(exist_ok=True)
        ext = d / "server.ext"
        ext.write_text(
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=DNS:localhost,DNS:mail.example.test,IP:127.0.0.1\n"
        )
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run(["openssl", "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem",
             "-days", "2", "-subj", "/CN=mailbridge interop test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        run(["openssl", "req", *ec, "-keyout", d / "server.key", "-out", d / "server.csr",
             "-subj", "/CN=localhost"])
        run(["openssl", "x509", "-req", "-in", d / "server.csr", "-CA", d / "ca.pem",
             "-CAkey", d / "ca.key", "-CAcreateserial", "-out", d / "server.crt",
             "-days", "2", "-extfile", ext])
        (d / "server.pem").write_text((d / "server.crt").read_text() + (d / "ca.pem").read_text())
        # Dovecot reads the key as root; Postfix's smtpd reads it as root too.
        os.chmod(d / "server.key", 0o600)
        os.chmod(d / "ca.key", 0o600)

    def start_oidc(self):
        log = self.dir / "oidc.log"
        env = dict(os.environ, OIDC_PORT=str(self.ports["oidc"]), NODE_ENV="test",
                   DEBUG="")
        with open(log, "wb") as out:
            p = subprocess.Popen(["node", str(HERE / "oidc" / "server.mjs")], cwd=HERE / "oidc",
                                 env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True)
        self.pids["oidc"] = p.pid
        self.save()
        wait_port(self.ports["oidc"], proc=p, what="the OAuth2 server (node oidc/server.mjs)", log=log)
        # Ready means: discovery answers.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(self.oidc_url + "/.well-known/openid-configuration", timeout=5) as r:
                    json.load(r)
                    break
            except (OSError, ValueError) as e:
                if time.monotonic() > deadline:
                    raise StackError(f"the OAuth2 server does not answer discovery: {e}{tail(log)}")
                time.sleep(0.1)

    def start_dovecot(self):
        d = self.dir / "dovecot"
        for sub in ["run", "state"]:
            (d / sub).mkdir(parents=True, exist_ok=True)
        mail = pwd.getpwnam("mail")
        (self.dir / "mail").mkdir(exist_ok=True)
        os.chown(self.dir / "mail", mail.pw_uid, mail.pw_gid)
        dh = Path("/usr/share/dovecot/dh.pem")
        values = {
            "DIR": self.dir,
            "RUN_ID": self.dir.name,
            "MAIL_UID": mail.pw_uid,
            "MAIL_GID": mail.pw_gid,
            "SSL_DH": f"ssl_dh = <{dh}" if dh.exists() else "",
            "IMAP_PORT": self.ports["imap"],
            "IMAPS_PORT": self.ports["imaps"],
            "POP3_PORT": self.ports["pop3"],
            "POP3S_PORT": self.ports["pop3s"],
            "OIDC_PORT": self.ports["oidc"],
        }
        render(HERE / "dovecot" / "dovecot.conf", d / "dovecot.conf", values)
        render(HERE / "dovecot" / "oauth2.conf.ext", d / "oauth2.conf.ext", values)
        os.chmod(d / "oauth2.conf.ext", 0o600)
        log = self.dir / "dovecot.log"
        p = run_daemon(["dovecot", "-c", d / "dovecot.conf"], self.dir / "dovecot.out")
        if p != 0:
            raise StackError(f"dovecot did not start ({p}){tail(self.dir / 'dovecot.out')}{tail(log)}")
        pidfile = d / "run" / "master.pid"
        wait_path(pidfile, what="Dovecot's pid file", log=log)
        self.pids["dovecot"] = int(pidfile.read_text().split()[0])
        self.save()
        for k in ["imap", "imaps", "pop3", "pop3s"]:
            wait_port(self.ports[k], what=f"Dovecot ({k})", log=log)
        wait_path(d / "run" / "auth-postfix", what="Dovecot's SASL socket for Postfix", log=log)
        wait_path(d / "run" / "lmtp", what="Dovecot's LMTP socket", log=log)

    def start_postfix(self):
        d = self.dir / "postfix"
        (d / "etc").mkdir(parents=True, exist_ok=True)
        for sub in ["queue", "data"]:
            (d / sub).mkdir(exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        os.chown(d / "data", postfix.pw_uid, postfix.pw_gid)
        users = ", ".join([f"{address(u)}=OK" for u in USERS] + [f"{UTF8_ADDRESS}=OK"])
        logins = ", ".join(f"{address(u)}={address(u)}" for u in USERS)
        values = {
            "DIR": self.dir,
            "SUBMISSION_PORT": self.ports["submission"],
            "SUBMISSIONS_PORT": self.ports["submissions"],
            "VIRTUAL_MAILBOX_MAPS": f"inline:{{ {users} }}",
            "SENDER_LOGIN_MAPS": f"inline:{{ {logins} }}",
            "TRANSPORT_MAPS": f"inline:{{ {UTF8_ADDRESS}=discard:smtputf8-delivered }}",
        }
        render(HERE / "postfix" / "main.cf", d / "etc" / "main.cf", values)
        render(HERE / "postfix" / "master.cf", d / "etc" / "master.cf", values)
        log = self.dir / "postfix.log"
        conf = str(d / "etc")
        p = run(["postfix", "-c", conf, "check"], check=False)
        if p.returncode != 0:
            raise StackError(f"postfix check failed: {p.stderr.strip()}")
        p = run_daemon(["postfix", "-c", conf, "start"], self.dir / "postfix.out")
        if p != 0:
            raise StackError(f"postfix did not start ({p}){tail(self.dir / 'postfix.out')}{tail(log)}")
        pidfile = d / "queue" / "pid" / "master.pid"
        wait_path(pidfile, what="Postfix's pid file", log=log)
        self.pids["postfix"] = int(pidfile.read_text().split()[0])
        self.save()
        for k in ["submission", "submissions"]:
            wait_port(self.ports[k], what=f"Postfix ({k})", log=log)

    def start_haproxy(self, port, target_port):
        """haproxy in TCP mode on 127.0.0.1:`port`, sending a PROXY protocol
        v2 header (send-proxy-v2) before each connection it forwards to
        127.0.0.1:`target_port`."""
        d = self.dir / "haproxy"
        d.mkdir(exist_ok=True)
        conf = d / "haproxy.cfg"
        conf.write_text("\n".join([
            "global",
            "    maxconn 100",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 60s",
            "    timeout server 60s",
            "frontend mail",
            f"    bind 127.0.0.1:{port}",
            "    default_backend mailbridge",
            "backend mailbridge",
            f"    server mb 127.0.0.1:{target_port} send-proxy-v2",
            "",
        ]))
        exe = find_exe("haproxy", ["/usr/sbin"])
        run([exe, "-c", "-f", str(conf)], timeout=30)
        log = self.dir / "haproxy.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen([exe, "-db", "-f", str(conf)], stdin=subprocess.DEVNULL,
                                    stdout=f, stderr=f, start_new_session=True)
        self.pids["haproxy"] = proc.pid
        self.save()
        wait_port(port, proc=proc, what="haproxy", log=log)

    # -- stop ---------------------------------------------------------------
    def stop(self):
        """Stops everything started in this directory; safe to call twice."""
        problems = []
        mb = self.dir / "mailbridge.pid"
        if mb.exists():
            try:
                stop_pid(int(mb.read_text()))
            except ValueError:
                pass
            mb.unlink(missing_ok=True)
        conf = self.dir / "postfix" / "etc"
        if self.pids.get("postfix"):
            if (conf / "main.cf").exists():
                try:
                    run(["postfix", "-c", str(conf), "stop"], timeout=30, check=False)
                except subprocess.TimeoutExpired:
                    problems.append("postfix stop timed out")
            if not wait_gone(self.pids["postfix"], 10):
                stop_pid(self.pids["postfix"], group=False)
            self.pids.pop("postfix")
        if self.pids.get("dovecot"):
            stop_pid(self.pids["dovecot"], group=False)
            self.pids.pop("dovecot")
        if self.pids.get("haproxy"):
            stop_pid(self.pids["haproxy"])
            self.pids.pop("haproxy")
        if self.pids.get("oidc"):
            stop_pid(self.pids["oidc"])
            self.pids.pop("oidc")
        if self.state_file.exists():
            self.save()
        return problems


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "Z":
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                return False
    except OSError:
        return False
    return True


def wait_gone(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


def stop_pid(pid, group=True, timeout=10):
    """SIGTERM (to the process group when it leads one), then SIGKILL."""
    if not alive(pid):
        return
    target = -pid if group and _leads_group(pid) else pid
    try:
        os.kill(target, signal.SIGTERM)
    except ProcessLookupError:
        return
    if wait_gone(pid, timeout):
        return
    try:
        os.kill(target, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_gone(pid, 5)


def _leads_group(pid):
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def main(argv):
    if len(argv) >= 2 and argv[1] == "check":
        why = missing_prerequisites()
        for w in why:
            print(w)
        return 1 if why else 0
    if len(argv) == 3 and argv[1] == "start":
        s = Stack(argv[2])
        try:
            s.start()
        except StackError as e:
            print(f"cannot start: {e}", file=sys.stderr)
            s.stop()
            return 1
        print(json.dumps(s.ports))
        return 0
    if len(argv) == 3 and argv[1] == "stop":
        if Path(argv[2]).exists():
            Stack(argv[2]).stop()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
