//! File-capture benchmark: a burst of files whose tokens expire, through the whole bridge (webhook →
//! spool → capture → Kafka record with `huggy_bridge_files`), against a local file host that behaves like
//! a real one under load: a first-byte delay and a per-connection rate limit (optionally an
//! aggregate cap too). Runs the burst with deadline-driven concurrency and, with `--compare-fixed`,
//! again with the concurrency fixed at the floor, in the same process.
//!
//! ```text
//! cargo run --release -p huggy-bridge-tools --bin filebench -- --files 1200 --min-kib 200 --max-kib 2500 \
//!     --first-byte-ms 300 --conn-kib-per-sec 1000 --ttl-secs 90 --compare-fixed
//! ```
//!
//! Reports files/s, MB/s, stored and expired files, the peak download concurrency, the minimum
//! token headroom at completion (seconds left before the URL's token died, as the host saw it) and
//! the process's peak RSS during the burst (the host runs in the same process).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use huggy_bridge::app;
use huggy_bridge::config::{Config, Secret};
use huggy_bridge::metrics::counter_sum;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value_t = 1200)]
    files: usize,
    #[arg(long, default_value_t = 200)]
    min_kib: usize,
    #[arg(long, default_value_t = 2500)]
    max_kib: usize,
    /// Events per webhook batch.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// The host's delay before the first byte of each response.
    #[arg(long, default_value_t = 300)]
    first_byte_ms: u64,
    /// The host's rate limit per connection.
    #[arg(long, default_value_t = 1000)]
    conn_kib_per_sec: u64,
    /// The host's aggregate rate limit (0 = none).
    #[arg(long, default_value_t = 0)]
    host_kib_per_sec: u64,
    /// Token lifetime (Huggy: 600).
    #[arg(long, default_value_t = 90)]
    ttl_secs: u64,
    /// files.concurrency (the floor).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// files.max_concurrency.
    #[arg(long, default_value_t = 256)]
    max_concurrency: usize,
    /// Also run the burst with concurrency fixed at the floor.
    #[arg(long)]
    compare_fixed: bool,
    /// files.max_buffer_bytes, in MiB (the capture's memory budget).
    #[arg(long, default_value_t = 64)]
    max_buffer_mib: u64,
    /// Log filter (e.g. `warn,huggy_bridge::files=info` shows every change of the limit).
    #[arg(long, default_value = "error")]
    log: String,
}

fn size_of(i: usize, a: &Args) -> usize {
    let span = (a.max_kib - a.min_kib) * 1024;
    a.min_kib * 1024 + (i * 7_919_993) % span.max(1)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Clone)]
struct Host {
    sizes: Arc<Vec<usize>>,
    noise: bytes::Bytes,
    first_byte: Duration,
    per_conn_bps: f64,
    aggregate: Option<(Arc<Mutex<Instant>>, f64)>,
    active: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    expired: Arc<AtomicUsize>,
    /// Smallest (token expiry − completion time) over completed responses, in milliseconds.
    min_headroom_ms: Arc<Mutex<Option<i64>>>,
}

struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

const CHUNK: usize = 64 * 1024;

async fn file(State(h): State<Host>, Path(i): Path<usize>, Query(q): Query<HashMap<String, String>>) -> Response {
    let exp: f64 = q.get("exp").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    if unix_now() > exp + 1.0 {
        h.expired.fetch_add(1, Ordering::SeqCst);
        return (StatusCode::FORBIDDEN, "token expired").into_response();
    }
    let Some(&size) = h.sizes.get(i) else { return StatusCode::NOT_FOUND.into_response() };
    let n = h.active.fetch_add(1, Ordering::SeqCst) + 1;
    h.peak.fetch_max(n, Ordering::SeqCst);
    let busy = Busy(h.active.clone());
    tokio::time::sleep(h.first_byte).await;
    let started = Instant::now();
    // Content: a window into a shared random buffer, different per file (no copy, no per-byte work).
    let offset = (i * 4099) % (h.noise.len() - CHUNK);
    let stream = futures::stream::unfold((0usize, busy), move |(sent, busy)| {
        let h = h.clone();
        async move {
            if sent >= size {
                return None;
            }
            let end = (sent + CHUNK).min(size);
            let due = started + Duration::from_secs_f64(end as f64 / h.per_conn_bps);
            tokio::time::sleep_until(due.into()).await;
            if let Some((next, rate)) = &h.aggregate {
                let at = {
                    let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                    *n = (*n).max(Instant::now()) + Duration::from_secs_f64((end - sent) as f64 / rate);
                    *n
                };
                tokio::time::sleep_until(at.into()).await;
            }
            if end == size {
                // The client stops reading at Content-Length: the last chunk is the completion.
                let left = ((exp + 1.0 - unix_now()) * 1000.0) as i64;
                let mut m = h.min_headroom_ms.lock().unwrap_or_else(|p| p.into_inner());
                *m = Some(m.map_or(left, |v| v.min(left)));
            }
            let at = (offset + sent) % (h.noise.len() - CHUNK);
            let chunk = h.noise.slice(at..at + (end - sent));
            Some((Ok::<_, std::io::Error>(chunk), (end, busy)))
        }
    });
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(size));
    (headers, axum::body::Body::from_stream(stream)).into_response()
}

struct Run {
    took: Duration,
    stored: u64,
    expired: u64,
    failed: u64,
    peak_limit: i64,
    peak_active: i64,
    host_peak: usize,
    min_headroom_ms: Option<i64>,
    /// Peak resident set of this process during the run (Linux; 0 elsewhere).
    peak_rss: u64,
}

/// This process's peak resident set (`VmHWM`) in bytes; 0 where `/proc` has none.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

async fn burst(args: &Args, max_concurrency: usize) -> anyhow::Result<Run> {
    let sizes: Vec<usize> = (0..args.files).map(|i| size_of(i, args)).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..8 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let host = Host {
        sizes: Arc::new(sizes),
        noise: bytes::Bytes::from(noise),
        first_byte: Duration::from_millis(args.first_byte_ms),
        per_conn_bps: args.conn_kib_per_sec as f64 * 1024.0,
        aggregate: (args.host_kib_per_sec > 0)
            .then(|| (Arc::new(Mutex::new(Instant::now())), args.host_kib_per_sec as f64 * 1024.0)),
        active: Arc::default(),
        peak: Arc::default(),
        expired: Arc::default(),
        min_headroom_ms: Arc::default(),
    };
    let router = axum::Router::new().route("/files/{i}", axum::routing::get(file)).with_state(host.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server: SocketAddr = listener.local_addr()?;
    let server_task = tokio::spawn(async move { axum::serve(listener, router).await });

    let dir = std::env::temp_dir().join(format!("filebench-{}-{max_concurrency}", std::process::id()));
    let mut cfg = Config::default();
    cfg.http.listen = "127.0.0.1:0".parse()?;
    cfg.admin.listen = "127.0.0.1:0".parse()?;
    cfg.huggy.tokens = vec![Secret::new("bench")];
    cfg.kafka.brokers = "embedded".into();
    cfg.spool.dir = dir.join("spool");
    cfg.spool.max_undelivered_age_secs = cfg.spool.max_undelivered_age_secs.max(args.ttl_secs + 1);
    cfg.files.allowed_url_prefixes = vec![format!("http://{server}/files/")];
    cfg.files.store = format!("file://{}", dir.join("store").display());
    cfg.files.token_ttl_secs = args.ttl_secs;
    cfg.files.concurrency = args.concurrency;
    cfg.files.max_concurrency = max_concurrency;
    cfg.files.max_file_bytes = (args.max_kib as u64 + 1) * 1024;
    cfg.files.max_buffer_bytes = args.max_buffer_mib * 1024 * 1024;
    let d = app::start(cfg, CancellationToken::new()).await?;
    // Peak RSS from here (Linux `clear_refs` 5 resets VmHWM to the current RSS).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let http = reqwest::Client::new();
    let started = Instant::now();
    let ids: Vec<usize> = (0..args.files).collect();
    for chunk in ids.chunks(args.batch.max(1)) {
        // Signed as Huggy would when it sends the batch: the token lives `ttl_secs` from now.
        let exp = unix_now().floor() as u64 + args.ttl_secs;
        let chunk: Vec<String> = chunk
            .iter()
            .map(|i| {
                let u = format!("http://{server}/files/{i}?exp={exp}");
                format!(r#"{{"id":{i},"file":"{u}","chat":{{"id":{}}},"company":{{"id":1}}}}"#, i % 50)
            })
            .collect();
        let body = format!(r#"{{"time":1,"token":"bench","messages":{{"receivedMessage":[{}]}}}}"#, chunk.join(","));
        let r = http.post(format!("http://{}/webhooks/huggy", d.http_addr)).body(body).send().await?;
        anyhow::ensure!(r.status().is_success(), "webhook answered {}", r.status());
    }
    let (mut peak_limit, mut peak_active) = (0, 0);
    while counter_sum(&d.metrics.events_published) < args.files as u64 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(args.ttl_secs * 3 + 60), "not all published");
        peak_limit = peak_limit.max(d.metrics.file_concurrency_limit.get());
        peak_active = peak_active.max(d.metrics.file_concurrency.get());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let get = |r: &str| d.metrics.file_downloads.with_label_values(&[r]).get();
    let run = Run {
        took,
        stored: get("stored"),
        expired: get("expired"),
        failed: counter_sum(&d.metrics.file_downloads) - get("stored") - get("expired"),
        peak_limit,
        peak_active,
        host_peak: host.peak.load(Ordering::SeqCst),
        min_headroom_ms: *host.min_headroom_ms.lock().unwrap_or_else(|p| p.into_inner()),
        peak_rss: peak_rss(),
    };
    d.shutdown();
    d.wait().await?;
    server_task.abort();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(run)
}

fn report(label: &str, args: &Args, mb: f64, r: &Run) {
    let secs = r.took.as_secs_f64();
    println!(
        "{label:>16}: {secs:>7.1} s {:>7.1} files/s {:>6.1} MB/s  stored {}/{} expired {} failed {}  peak concurrency {} (limit {}, host saw {})  min headroom {}  peak RSS {} MiB (buffer budget {} MiB)",
        r.stored as f64 / secs,
        mb * r.stored as f64 / args.files as f64 / secs,
        r.stored,
        args.files,
        r.expired,
        r.failed,
        r.peak_active,
        r.peak_limit,
        r.host_peak,
        r.min_headroom_ms.map_or("-".to_owned(), |ms| format!("{:.1} s", ms as f64 / 1000.0)),
        r.peak_rss / (1024 * 1024),
        args.max_buffer_mib,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut quiet = Config::default();
    quiet.log.level = args.log.clone();
    huggy_bridge::telemetry::init(&quiet.log);
    let total: usize = (0..args.files).map(|i| size_of(i, &args)).sum();
    let mb = total as f64 / 1e6;
    println!(
        "burst: {} files, {mb:.1} MB ({}–{} KiB) in batches of {}; host: {} ms to first byte, {} KiB/s a connection{}; tokens {} s",
        args.files,
        args.min_kib,
        args.max_kib,
        args.batch,
        args.first_byte_ms,
        args.conn_kib_per_sec,
        if args.host_kib_per_sec > 0 { format!(", {} KiB/s in all", args.host_kib_per_sec) } else { String::new() },
        args.ttl_secs
    );
    let adaptive = burst(&args, args.max_concurrency).await?;
    report(&format!("{}..{}", args.concurrency, args.max_concurrency), &args, mb, &adaptive);
    if args.compare_fixed {
        let fixed = burst(&args, args.concurrency).await?;
        report(&format!("fixed {}", args.concurrency), &args, mb, &fixed);
    }
    Ok(())
}
