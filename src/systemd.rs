//! systemd's notification protocol (`Type=notify`): `READY=1`, `STOPPING=1`, `WATCHDOG=1` and
//! `EXTEND_TIMEOUT_USEC`, sent as datagrams to `$NOTIFY_SOCKET`.
//!
//! The watchdog is fed only while liveness (`/healthz`) passes, so systemd restarts a stuck daemon
//! as Kubernetes would; a long spool recovery extends the start timeout instead of being killed by it.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

/// Where notifications go, and how often systemd wants `WATCHDOG=1`.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: PathBuf,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// A notifier for `socket` (a path, or `@name` for an abstract socket); `watchdog` is systemd's
    /// `WatchdogSec` (the daemon notifies twice as often).
    pub fn new(socket: impl Into<PathBuf>, watchdog: Option<Duration>) -> Notifier {
        Notifier { socket: socket.into(), watchdog }
    }

    /// The notifier systemd set up through `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honouring
    /// `WATCHDOG_PID`); `None` outside a `Type=notify` unit.
    pub fn from_env() -> Option<Notifier> {
        let socket = std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())?;
        let for_us = std::env::var("WATCHDOG_PID").ok().is_none_or(|p| p.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(Duration::from_micros);
        Some(Notifier::new(PathBuf::from(socket), watchdog))
    }

    /// systemd's watchdog interval, when it asked for one.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends one notification, e.g. `READY=1`.
    ///
    /// # Errors
    /// The socket cannot be reached.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        match abstract_name(&self.socket) {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)?;
            }
            None => {
                sock.send_to(state.as_bytes(), &self.socket)?;
            }
        }
        Ok(())
    }

    /// Sends `state`, logging a failure instead of returning it.
    pub(crate) fn send(&self, state: &str) {
        match self.notify(state) {
            Ok(()) => debug!(state, "sd_notify"),
            Err(e) => warn!(state, error = %e, socket = %self.socket.display(), "sd_notify failed"),
        }
    }

    /// Extends systemd's start (or stop) timeout while the returned guard lives: every `period`,
    /// `EXTEND_TIMEOUT_USEC` for three periods more. Nothing is sent when the work ends within
    /// the first period.
    pub(crate) fn extend_timeout_while(&self, period: Duration, why: &'static str) -> ExtendGuard {
        let (tx, rx) = mpsc::channel::<()>();
        let notifier = self.clone();
        let usec = (period * 3).as_micros();
        let spawned = std::thread::Builder::new().name("sd-extend".into()).spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(period) {
                debug!(why, "still busy; extending systemd's timeout");
                notifier.send(&format!("EXTEND_TIMEOUT_USEC={usec}"));
            }
        });
        if let Err(e) = &spawned {
            warn!(error = %e, "cannot start the thread that extends systemd's timeout");
        }
        ExtendGuard { _stop: tx }
    }
}

/// Stops the `EXTEND_TIMEOUT_USEC` messages when dropped.
pub(crate) struct ExtendGuard {
    _stop: mpsc::Sender<()>,
}

/// The name of an abstract socket (`@name`), if `socket` is one.
fn abstract_name(socket: &Path) -> Option<&[u8]> {
    use std::os::unix::ffi::OsStrExt;
    socket.as_os_str().as_bytes().strip_prefix(b"@")
}

/// Sends `WATCHDOG=1` twice per `interval` while liveness (`/healthz`) passes, and withholds it
/// while the daemon is stuck, so that systemd restarts it as Kubernetes would. Keeps going through
/// the drain: a drain that hangs is stuck too.
pub(crate) async fn feed_watchdog(
    notifier: Notifier,
    interval: Duration,
    health: Arc<crate::health::Health>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut withheld = false;
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let reasons = health.not_live_reasons();
        if reasons.is_empty() {
            if withheld {
                tracing::info!("liveness passes again; feeding the systemd watchdog");
                withheld = false;
            }
            notifier.send("WATCHDOG=1");
        } else if !withheld {
            tracing::error!(
                reasons = reasons.join("; "),
                "liveness fails; withholding WATCHDOG=1 so that systemd restarts the daemon"
            );
            withheld = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (tempfile::TempDir, UnixDatagram, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        (dir, sock, path)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn notifications_reach_a_path_socket() {
        let (_dir, sock, path) = listener();
        let n = Notifier::new(&path, None);
        n.notify("READY=1").expect("sent");
        assert_eq!(recv(&sock), "READY=1");
    }

    #[test]
    fn notifications_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("huggy-bridge-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        Notifier::new(format!("@{name}"), None).notify("STOPPING=1").expect("sent");
        assert_eq!(recv(&sock), "STOPPING=1");
    }

    #[test]
    fn the_timeout_is_extended_while_the_guard_lives_and_not_after() {
        let (_dir, sock, path) = listener();
        let n = Notifier::new(&path, None);
        let guard = n.extend_timeout_while(Duration::from_millis(50), "test");
        assert_eq!(recv(&sock), "EXTEND_TIMEOUT_USEC=150000");
        assert_eq!(recv(&sock), "EXTEND_TIMEOUT_USEC=150000");
        drop(guard);
        // Whatever was in flight when the guard dropped, then silence.
        sock.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        let mut buf = [0u8; 64];
        let mut after = 0;
        while sock.recv(&mut buf).is_ok() {
            after += 1;
        }
        assert!(after <= 1, "{after} notifications after the guard dropped");
    }
}
