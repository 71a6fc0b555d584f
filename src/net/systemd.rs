//! systemd integration: what the service manager is told (readiness,
//! reloads, the drain, a status line and watchdog pings: sd_notify(3)),
//! and the listening sockets it hands over by socket activation
//! (sd_listen_fds(3)). Without `NOTIFY_SOCKET`, `WATCHDOG_USEC` or
//! `LISTEN_FDS` in the environment none of this does anything.
//!
//! The unsafe parts (raw descriptors, the monotonic clock) live in the
//! `listenfd` and `sd-notify` crates; this module forbids unsafe code like
//! the rest of the crate.

use std::net::SocketAddr;
use std::time::Duration;

/// How often the status line is looked at (it is sent only when it
/// changed).
pub const STATUS_EVERY: Duration = Duration::from_secs(2);

/// READY=1: every listener is bound and serving. `status` becomes the
/// unit's status line (`systemctl status`).
pub fn ready(status: &str) {
    #[cfg(unix)]
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    #[cfg(not(unix))]
    let _ = status;
}

/// RELOADING=1 with the monotonic time it began: a SIGHUP reload is under
/// way; [`ready`] ends it.
pub fn reloading() {
    #[cfg(unix)]
    {
        let mut states = vec![
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::Status("reloading the configuration"),
        ];
        // systemd wants the time with RELOADING=1, to tell this reload
        // from an earlier one it has already seen end.
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            states.insert(1, now);
        }
        send(&states);
    }
}

/// STOPPING=1: the drain at SIGTERM has begun.
pub fn stopping(status: &str) {
    #[cfg(unix)]
    send(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status(status),
    ]);
    #[cfg(not(unix))]
    let _ = status;
}

/// A new status line.
pub fn status(status: &str) {
    #[cfg(unix)]
    send(&[sd_notify::NotifyState::Status(status)]);
    #[cfg(not(unix))]
    let _ = status;
}

/// How often to send WATCHDOG=1: half of `WATCHDOG_USEC`, when the
/// watchdog is on and meant for this process (`WATCHDOG_PID`, if set, is
/// ours).
pub fn watchdog_every() -> Option<Duration> {
    #[cfg(unix)]
    {
        sd_notify::watchdog_enabled()
            .filter(|d| !d.is_zero())
            .map(|d| d / 2)
    }
    #[cfg(not(unix))]
    None
}

/// Keeps the service manager informed until aborted: the status line from
/// `status` when it changes (looked at every [`STATUS_EVERY`]), and
/// WATCHDOG=1 every half watchdog period. The pings come from a task on
/// the server's runtime that has just read the server's state through
/// `status`: a runtime that no longer runs tasks, or a lock held forever,
/// stops them and lets systemd restart the service.
pub async fn keep_informed(status: impl Fn() -> String) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = watchdog_every();
    if let Some(every) = watchdog {
        tracing::info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
    }
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    for tick in [&mut status_tick, &mut watchdog_tick] {
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let mut last = String::new();
    loop {
        let ping = tokio::select! {
            _ = status_tick.tick() => false,
            _ = watchdog_tick.tick() => watchdog.is_some(),
        };
        let now = status();
        let changed = now != last;
        #[cfg(unix)]
        {
            let mut states = Vec::new();
            if ping {
                states.push(sd_notify::NotifyState::Watchdog);
            }
            if changed {
                states.push(sd_notify::NotifyState::Status(&now));
            }
            if !states.is_empty() {
                send(&states);
            }
        }
        #[cfg(not(unix))]
        let _ = ping;
        if changed {
            last = now;
        }
    }
}

/// Sends one datagram to `$NOTIFY_SOCKET`, if set. Failures are logged
/// (the first one as a warning: systemd will give up on a service that
/// never says it is ready) and otherwise ignored.
#[cfg(unix)]
fn send(states: &[sd_notify::NotifyState<'_>]) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut message = String::new();
    for s in states {
        // A line break inside a value would start another assignment.
        message.push_str(&s.to_string().replace('\n', " "));
        message.push('\n');
    }
    if let Err(e) = send_to(&socket, message.as_bytes()) {
        if WARNED.swap(true, Ordering::Relaxed) {
            tracing::debug!(error = %e, socket = ?socket, "cannot notify systemd");
        } else {
            tracing::warn!(error = %e, socket = ?socket, "cannot notify systemd (NOTIFY_SOCKET)");
        }
    }
}

/// One datagram to the socket `path`; a name starting with `@` is in the
/// abstract namespace (which `sd_notify::notify` does not handle, hence
/// this).
#[cfg(unix)]
fn send_to(path: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let socket = UnixDatagram::unbound()?;
    match path.as_bytes().strip_prefix(b"@") {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Some(name) => {
            #[cfg(target_os = "android")]
            use std::os::android::net::SocketAddrExt;
            #[cfg(target_os = "linux")]
            use std::os::linux::net::SocketAddrExt;
            socket.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?;
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        Some(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "abstract sockets exist on Linux only",
            ));
        }
        None => socket.connect(path)?,
    }
    let sent = socket.send(message)?;
    if sent != message.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "the notification was cut short",
        ));
    }
    Ok(())
}

/// Listening sockets handed over by systemd (socket activation), not yet
/// claimed by a `[[listener]]`.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<InheritedSocket>,
}

#[derive(Debug)]
struct InheritedSocket {
    listener: std::net::TcpListener,
    /// What it is bound to (getsockname), which is how it is matched.
    addr: SocketAddr,
    /// Its name from `LISTEN_FDNAMES` (`FileDescriptorName=`, by default
    /// the socket unit's name), or `fd N`.
    name: String,
}

/// How an inherited socket bound to `actual` fits a listener configured to
/// bind `wanted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fit {
    /// Both are "any address" on the same port, one IPv4 and one IPv6: a
    /// `ListenStream=993` socket is `[::]:993` and takes IPv4 too, while a
    /// config says `0.0.0.0:993`.
    AnyAddress,
    /// The same address and port.
    Exact,
}

/// How (and whether) a socket bound to `actual` serves `wanted`.
pub fn fit(wanted: SocketAddr, actual: SocketAddr) -> Option<Fit> {
    let actual = SocketAddr::new(actual.ip().to_canonical(), actual.port());
    if wanted == actual {
        Some(Fit::Exact)
    } else if wanted.port() == actual.port()
        && wanted.ip().is_unspecified()
        && actual.ip().is_unspecified()
    {
        Some(Fit::AnyAddress)
    } else {
        None
    }
}

impl Inherited {
    /// No sockets: everything is bound by mailbridge itself.
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// Takes the sockets systemd passed (`LISTEN_FDS` from descriptor 3 on,
    /// when `LISTEN_PID` is this process) and removes those variables, so
    /// that no child process believes they are its own.
    ///
    /// Call it before any other thread exists (before the async runtime is
    /// built): it changes the environment. A descriptor that is not a TCP
    /// socket is logged and closed.
    pub fn from_env() -> Inherited {
        let Some(count) = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.trim().parse::<usize>().ok())
        else {
            return Inherited::none();
        };
        let for_us = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            == Some(std::process::id());
        if !for_us {
            // Passed to another process (an unset LISTEN_PID included:
            // systemd always sets it); not ours to take.
            tracing::debug!("LISTEN_FDS is set, but LISTEN_PID is not this process: ignored");
            return Inherited::none();
        }
        let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|n| n.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        let named = names.len() == count;
        #[cfg(unix)]
        {
            let mut fds = listenfd::ListenFd::from_env();
            let mut sockets = Vec::new();
            for idx in 0..fds.len() {
                let fd = 3 + idx;
                let name = match names.get(idx) {
                    Some(n) if named && !n.is_empty() => n.clone(),
                    _ => format!("fd {fd}"),
                };
                match fds.take_tcp_listener(idx) {
                    Ok(Some(listener)) => match listener.local_addr() {
                        Ok(addr) => sockets.push(InheritedSocket {
                            listener,
                            addr,
                            name,
                        }),
                        Err(e) => tracing::warn!(
                            socket = %name,
                            error = %e,
                            "an inherited socket has no address: closed"
                        ),
                    },
                    Ok(None) => {}
                    Err(e) => {
                        let closed = close_other(&mut fds, idx);
                        tracing::warn!(
                            socket = %name,
                            fd,
                            error = %e,
                            closed,
                            "an inherited descriptor is not a TCP listening socket; mailbridge listens on TCP only (ListenStream=)"
                        );
                    }
                }
            }
            Inherited { sockets }
        }
        #[cfg(not(unix))]
        Inherited::none()
    }

    /// How many sockets are left.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether none is left.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// The addresses of the sockets left, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|s| s.addr).collect()
    }

    /// Takes the socket that best serves a listener configured to bind
    /// `wanted` (the same address, else "any address" for "any address" on
    /// the same port), with its name.
    pub fn take(&mut self, wanted: SocketAddr) -> Option<(std::net::TcpListener, String)> {
        let (i, _) = self
            .sockets
            .iter()
            .enumerate()
            .filter_map(|(i, s)| fit(wanted, s.addr).map(|f| (i, f)))
            .max_by_key(|(i, f)| (*f, std::cmp::Reverse(*i)))?;
        let s = self.sockets.remove(i);
        Some((s.listener, s.name))
    }

    /// Closes the sockets no listener took, each with a warning: a
    /// `ListenStream=` without a matching `[[listener]]` serves nobody.
    pub fn close_unused(self) {
        for s in self.sockets {
            tracing::warn!(
                socket = %s.name,
                addr = %s.addr,
                "an inherited socket matches no [[listener]] bind address: closed (add a [[listener]] for it, or remove the ListenStream= line)"
            );
        }
    }
}

#[cfg(test)]
impl Inherited {
    /// Sockets as if inherited, for tests.
    pub(crate) fn from_listeners(listeners: Vec<(std::net::TcpListener, String)>) -> Inherited {
        Inherited {
            sockets: listeners
                .into_iter()
                .map(|(listener, name)| InheritedSocket {
                    addr: listener.local_addr().expect("bound"),
                    listener,
                    name,
                })
                .collect(),
        }
    }
}

/// Closes descriptor `idx` if it is a socket of another kind; whether it
/// could be.
#[cfg(unix)]
fn close_other(fds: &mut listenfd::ListenFd, idx: usize) -> bool {
    matches!(fds.take_unix_listener(idx), Ok(Some(_)))
        || matches!(fds.take_udp_socket(idx), Ok(Some(_)))
        || matches!(fds.take_unix_datagram(idx), Ok(Some(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sockets_fit_listeners_by_address() {
        assert_eq!(
            fit(a("127.0.0.1:993"), a("127.0.0.1:993")),
            Some(Fit::Exact)
        );
        assert_eq!(fit(a("[::1]:993"), a("[::1]:993")), Some(Fit::Exact));
        // ListenStream=993 is [::]:993 (IPv4 too); the config says 0.0.0.0.
        assert_eq!(fit(a("0.0.0.0:993"), a("[::]:993")), Some(Fit::AnyAddress));
        assert_eq!(fit(a("[::]:993"), a("0.0.0.0:993")), Some(Fit::AnyAddress));
        // An IPv4 address seen through an IPv6 socket.
        assert_eq!(
            fit(a("127.0.0.1:993"), a("[::ffff:127.0.0.1]:993")),
            Some(Fit::Exact)
        );
        assert_eq!(fit(a("127.0.0.1:993"), a("127.0.0.1:995")), None);
        assert_eq!(fit(a("127.0.0.1:993"), a("0.0.0.0:993")), None);
        assert_eq!(fit(a("0.0.0.0:993"), a("127.0.0.1:993")), None);
        assert_eq!(fit(a("127.0.0.1:993"), a("127.0.0.2:993")), None);
    }

    #[test]
    fn each_socket_is_taken_once_by_its_address() {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let second = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a1, a2) = (first.local_addr().unwrap(), second.local_addr().unwrap());
        let mut inherited =
            Inherited::from_listeners(vec![(first, "imap".into()), (second, "smtp".into())]);
        assert_eq!(inherited.take(a2).unwrap().1, "smtp");
        assert!(inherited.take(a2).is_none(), "taken already");
        assert_eq!(inherited.addrs(), vec![a1]);
        let (listener, name) = inherited.take(a1).unwrap();
        assert_eq!(
            (listener.local_addr().unwrap(), name.as_str()),
            (a1, "imap")
        );
        assert!(inherited.is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn one_datagram_to_a_path_or_an_abstract_name() {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
        let dir = std::env::temp_dir().join(format!("mailbridge-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        send_to(path.as_os_str(), b"READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
        std::fs::remove_dir_all(&dir).unwrap();

        let name = format!("mailbridge-notify-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        send_to(std::ffi::OsStr::new(&format!("@{name}")), b"STOPPING=1\n").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }
}
