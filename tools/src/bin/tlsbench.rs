//! What a new HTTPS connection costs the daemon (`[http.tls]`).
//!
//! ```text
//! tlsbench --addr 127.0.0.1:8443 --ca ca.pem --pid <daemon pid> --connections 2000 --concurrency 2
//! ```
//!
//! Opens `--connections` new connections, `--concurrency` at a time, each doing a full TLS handshake
//! (no session resumption: every client config is fresh) and then closing; then the same number of
//! plain TCP connections to `--plain-addr` if given (e.g. the admin listener) for comparison. Prints
//! handshakes per second, latency percentiles and, with `--pid`, the daemon's CPU time per
//! connection (from /proc), which is the cost on the server side.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

#[derive(Parser, Debug)]
#[command(about = "Cost of a new HTTPS connection to huggy-bridge")]
struct Args {
    /// The TLS listener.
    #[arg(long)]
    addr: SocketAddr,
    /// PEM of the CA that signed the daemon's certificate.
    #[arg(long)]
    ca: PathBuf,
    /// Name the certificate is for.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// A plain TCP listener of the same process to compare with (connect and close), e.g. the
    /// admin listener.
    #[arg(long)]
    plain_addr: Option<SocketAddr>,
    /// The daemon's pid, for its CPU time per connection.
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Offer only TLS 1.2 (default: 1.3 and 1.2, as rustls negotiates).
    #[arg(long)]
    tls12: bool,
}

/// User plus system CPU time of `pid`, in seconds.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run<F, Fut>(n: usize, concurrency: usize, pid: Option<u32>, one: F) -> anyhow::Result<String>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let cpu0 = pid.map(cpu_secs).transpose()?;
    let began = Instant::now();
    let per_worker = n / concurrency;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let one = one.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_worker);
            for _ in 0..per_worker {
                let t = Instant::now();
                one().await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await??);
    }
    let wall = began.elapsed();
    let cpu = match (pid, cpu0) {
        (Some(pid), Some(c0)) => {
            format!(", daemon CPU {:.0} µs/connection", (cpu_secs(pid)? - c0) * 1e6 / lat.len() as f64)
        }
        _ => String::new(),
    };
    lat.sort();
    Ok(format!(
        "{} connections in {:.2}s: {:.0}/s, latency p50 {:.2} ms, p99 {:.2} ms{cpu}",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] =
        if args.tls12 { &[&rustls::version::TLS12] } else { rustls::DEFAULT_VERSIONS };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // No resumption: every connection pays the full handshake, as a client without a session cache does.
    config.resumption = rustls::client::Resumption::disabled();
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(args.server_name.clone())?;

    let (addr, c, n) = (args.addr, connector.clone(), name.clone());
    let tls = run(args.connections, args.concurrency, args.pid, move || {
        let (c, n) = (c.clone(), n.clone());
        async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let s = c.connect(n, tcp).await?;
            drop(s);
            Ok(())
        }
    })
    .await?;
    println!("TLS{} handshake: {tls}", if args.tls12 { " 1.2" } else { "" });
    if let Some(plain) = args.plain_addr {
        let tcp = run(args.connections, args.concurrency, args.pid, move || async move {
            let s = TcpStream::connect(plain).await?;
            drop(s);
            Ok(())
        })
        .await?;
        println!("plain TCP connect: {tcp}");
    }
    Ok(())
}
