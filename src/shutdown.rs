//! Signals: SIGTERM/SIGINT begin the drain and a second one exits at once; SIGHUP reloads the
//! configuration.

use std::path::PathBuf;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::reload::Reloader;

/// Exit status after a second SIGTERM/SIGINT cut the drain short (128 + SIGTERM, as a shell reports
/// a process killed by it).
pub const INTERRUPTED_EXIT_CODE: i32 = 143;

fn listen(kind: SignalKind, name: &'static str) -> Option<Signal> {
    match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, signal = name, "cannot listen for the signal");
            None
        }
    }
}

async fn recv(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT; a second one exits the process at once, without
/// finishing the drain. Nothing acknowledged is lost by that: every 2xx was given after the event
/// was durable (in the spool, or in Kafka in `kafka` mode); a request cut off gets no answer and
/// Huggy sends it again.
pub fn cancel_on_signals(token: CancellationToken) {
    let mut term = listen(SignalKind::terminate(), "SIGTERM");
    let mut int = listen(SignalKind::interrupt(), "SIGINT");
    tokio::spawn(async move {
        tokio::select! {
            () = recv(&mut int) => info!("SIGINT received; shutting down (a second SIGINT/SIGTERM exits at once)"),
            () = recv(&mut term) => info!("SIGTERM received; shutting down (a second SIGINT/SIGTERM exits at once)"),
        }
        token.cancel();
        let name = tokio::select! {
            () = recv(&mut int) => "SIGINT",
            () = recv(&mut term) => "SIGTERM",
        };
        error!(
            signal = name,
            "second signal: exiting now without finishing the drain; acknowledged events are safe in the spool (or in Kafka), unacknowledged requests will be sent again by Huggy"
        );
        std::process::exit(INTERRUPTED_EXIT_CODE);
    });
}

/// Listens for SIGHUP from now on (so that it no longer terminates the process, even before the
/// daemon has started); [`reload_on_hangup`] acts on it.
pub fn hangups() -> Option<Signal> {
    listen(SignalKind::hangup(), "SIGHUP")
}

/// Reloads the configuration from `path` on every SIGHUP received through `hangups`, until `stop`.
pub fn reload_on_hangup(hangups: Option<Signal>, reloader: Reloader, path: Option<PathBuf>, stop: CancellationToken) {
    let mut hangups = hangups;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = recv(&mut hangups) => {}
                () = stop.cancelled() => break,
            }
            info!("SIGHUP received; reloading the configuration");
            let (r, p) = (reloader.clone(), path.clone());
            // Reading files: off the async workers. The result is logged and counted by `reload`.
            if let Err(e) = tokio::task::spawn_blocking(move || r.reload(p.as_deref())).await {
                warn!(error = %e, "configuration reload task failed");
            }
        }
    });
}
