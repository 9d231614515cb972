//! Load generator for huggy-bridge, with a reference server to compare against in the same run.
//!
//! ```text
//! loadgen --url http://127.0.0.1:8080/webhooks/huggy --pid <daemon pid> --connections 32 --duration-secs 20
//! ```
//!
//! POSTs realistic batches (the published Huggy examples, each event made unique so the dedup window
//! does not short-cut the work) over N keep-alive connections for a fixed time, then prints
//! requests/s, events/s, latency percentiles and the daemon's peak RSS. Unless `--no-reference`, it
//! first starts a reference — a minimal HTTP server (this binary, `--serve-reference`) that reads the
//! body and answers 200 — loads it the same way, and prints the ratios.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

const FIXTURES: &[&str] = &[
    include_str!("../../../tests/fixtures/receivedMessage.json"),
    include_str!("../../../tests/fixtures/startedChat+receivedMessage.json"),
    include_str!("../../../tests/fixtures/sentAllMessage.json"),
    include_str!("../../../tests/fixtures/receivedAllMessage.json"),
    include_str!("../../../tests/fixtures/closedChat.json"),
    include_str!("../../../tests/fixtures/agentEntered.json"),
    include_str!("../../../tests/fixtures/startedAutomationFlow+finishedAutomationFlow.json"),
    include_str!("../../../tests/fixtures/updatedCustomer.json"),
];

#[derive(Parser, Debug)]
#[command(about = "Load generator for huggy-bridge, with a reference server in the same run")]
struct Args {
    /// Webhook URL of the daemon under test.
    #[arg(long)]
    url: Option<String>,
    /// PID of the daemon, to report its peak RSS (VmHWM).
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Skip the reference server.
    #[arg(long)]
    no_reference: bool,
    /// Label printed for the daemon's line.
    #[arg(long, default_value = "bridge")]
    label: String,
    /// Run as the reference server on this address (used by loadgen itself).
    #[arg(long, hide = true)]
    serve_reference: Option<SocketAddr>,
}

struct Figures {
    requests: u64,
    events: u64,
    errors: u64,
    secs: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    peak_rss_kib: Option<u64>,
}

impl Figures {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    fn print(&self, label: &str) {
        println!(
            "{label:>10}: {:>9.0} req/s {:>9.0} events/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  errors {}  peak RSS {}",
            self.rps(),
            self.events as f64 / self.secs,
            self.p50,
            self.p99,
            self.p999,
            self.errors,
            self.peak_rss_kib.map_or("n/a".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        );
    }
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One batch with every event made unique by a `bench_n` member.
fn batch(counter: &AtomicU64, i: usize) -> (Bytes, u64) {
    let mut v: serde_json::Value = serde_json::from_str(FIXTURES[i % FIXTURES.len()]).expect("fixture is JSON");
    let mut events = 0;
    if let Some(messages) = v["messages"].as_object_mut() {
        for list in messages.values_mut() {
            for ev in list.as_array_mut().into_iter().flatten() {
                ev["bench_n"] = counter.fetch_add(1, Ordering::Relaxed).into();
                events += 1;
            }
        }
    }
    (Bytes::from(serde_json::to_vec(&v).expect("serializes")), events)
}

async fn run_load(url: &str, connections: usize, duration: Duration) -> (u64, u64, u64, Vec<u32>, f64) {
    let uri: hyper::Uri = url.parse().expect("valid --url");
    let addr = format!("{}:{}", uri.host().expect("host"), uri.port_u16().unwrap_or(80));
    let counter = Arc::new(AtomicU64::new(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let (addr, uri, counter, stop) = (addr.clone(), uri.clone(), counter.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut reqs, mut events, mut errors, mut lat) = (0u64, 0u64, 0u64, Vec::with_capacity(100_000));
                let mut i = c;
                'conn: while !stop.load(Ordering::Relaxed) {
                    let Ok(tcp) = tokio::net::TcpStream::connect(&addr).await else {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let Ok((mut send, conn)) =
                        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp)).await
                    else {
                        errors += 1;
                        continue;
                    };
                    tokio::spawn(conn);
                    while !stop.load(Ordering::Relaxed) {
                        let (body, n) = batch(&counter, i);
                        i += connections;
                        let req = Request::post(uri.clone())
                            .header("content-type", "application/json")
                            .body(Full::new(body))
                            .expect("request");
                        let t0 = Instant::now();
                        match send.send_request(req).await {
                            Ok(resp) => {
                                let ok = resp.status().is_success();
                                let _ = resp.into_body().collect().await;
                                lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                                if ok {
                                    reqs += 1;
                                    events += n;
                                } else {
                                    errors += 1;
                                }
                            }
                            Err(_) => {
                                errors += 1;
                                continue 'conn;
                            }
                        }
                    }
                }
                (reqs, events, errors, lat)
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let (mut reqs, mut events, mut errors, mut lat) = (0, 0, 0, Vec::new());
    for t in tasks {
        let (r, e, x, l) = t.await.expect("load task");
        reqs += r;
        events += e;
        errors += x;
        lat.extend(l);
    }
    (reqs, events, errors, lat, secs)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx]) / 1000.0
}

async fn measure(url: &str, pid: Option<u32>, args: &Args) -> Figures {
    // Warm up (connections, allocator, page cache), then measure.
    let _ = run_load(url, args.connections, Duration::from_secs(2)).await;
    let (requests, events, errors, mut lat, secs) =
        run_load(url, args.connections, Duration::from_secs(args.duration_secs)).await;
    lat.sort_unstable();
    Figures {
        requests,
        events,
        errors,
        secs,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        p999: percentile(&lat, 0.999),
        peak_rss_kib: pid.and_then(peak_rss_kib),
    }
}

/// The reference: read the whole body, answer 200 with a small JSON body.
async fn serve_reference(addr: SocketAddr) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("reference binds");
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                let body = req.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(format!(
                    "{{\"accepted\":{}}}",
                    body.len().min(1)
                )))))
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

fn main() {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    if let Some(addr) = args.serve_reference {
        rt.block_on(serve_reference(addr));
        return;
    }
    rt.block_on(async {
        let reference = if args.no_reference {
            None
        } else {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
                .args(["--serve-reference", &format!("127.0.0.1:{port}")])
                .spawn()
                .expect("reference starts");
            let url = format!("http://127.0.0.1:{port}/webhooks/huggy");
            let deadline = Instant::now() + Duration::from_secs(10);
            while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                assert!(Instant::now() < deadline, "reference did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let f = measure(&url, Some(child.id()), &args).await;
            let _ = child.kill();
            let _ = child.wait();
            Some(f)
        };
        println!(
            "connections {}, {} s per run, batches from the published Huggy examples",
            args.connections, args.duration_secs
        );
        if let Some(r) = &reference {
            r.print("reference");
        }
        if let Some(url) = &args.url {
            let b = measure(url, args.pid, &args).await;
            b.print(&args.label);
            if let Some(r) = &reference {
                println!(
                    "     ratio: throughput {:.2} x reference, p99 {:.2} x reference",
                    b.rps() / r.rps(),
                    b.p99 / r.p99
                );
            }
        }
    });
}
