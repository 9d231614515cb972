//! File-capture benchmark: a burst of N files through the bridge versus a plain sequential download of
//! the same files, on the same machine, in the same run.
//!
//! ```text
//! cargo run --release -p huggy-bridge-tools --bin filebench -- --files 200 --min-kib 10 --max-kib 2048
//! ```
//!
//! Starts a local file server (random bytes, sizes spread between the bounds), the daemon in-process
//! (embedded broker, spool on a temporary directory, local file store), POSTs one event per file, and
//! times until every event is published with its `bridge_files`. Then downloads the same files one
//! after the other into files (streamed, with SHA-256, as the bridge does) and times that.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use clap::Parser;
use futures::StreamExt;
use huggy_bridge::app;
use huggy_bridge::config::{Config, Secret};
use huggy_bridge::metrics::counter_sum;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200)]
    files: usize,
    #[arg(long, default_value_t = 10)]
    min_kib: usize,
    #[arg(long, default_value_t = 2048)]
    max_kib: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

fn size_of(i: usize, a: &Args) -> usize {
    let span = (a.max_kib - a.min_kib) * 1024;
    a.min_kib * 1024 + (i * 7_919_993) % span.max(1)
}

async fn file(State(sizes): State<std::sync::Arc<Vec<usize>>>, Path(i): Path<usize>) -> Vec<u8> {
    let mut x = i as u64 + 1;
    (0..sizes[i])
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sizes: Vec<usize> = (0..args.files).map(|i| size_of(i, &args)).collect();
    let total: usize = sizes.iter().sum();
    let router =
        axum::Router::new().route("/files/{i}", axum::routing::get(file)).with_state(std::sync::Arc::new(sizes));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server: SocketAddr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });

    let dir = std::env::temp_dir().join(format!("filebench-{}", std::process::id()));
    let mut cfg = Config::default();
    cfg.http.listen = "127.0.0.1:0".parse()?;
    cfg.admin.listen = "127.0.0.1:0".parse()?;
    cfg.huggy.tokens = vec![Secret::new("bench")];
    cfg.kafka.brokers = "embedded".into();
    cfg.spool.dir = dir.join("spool");
    cfg.files.allowed_url_prefixes = vec![format!("http://{server}/files/")];
    cfg.files.store = format!("file://{}", dir.join("store").display());
    cfg.files.concurrency = args.concurrency;
    cfg.log.level = "warn".into();
    huggy_bridge::telemetry::init(&cfg.log);
    let d = app::start(cfg, CancellationToken::new()).await?;
    let urls: Vec<String> = (0..args.files).map(|i| format!("http://{server}/files/{i}")).collect();
    let events: Vec<String> = urls
        .iter()
        .enumerate()
        .map(|(i, u)| format!(r#"{{"id":{i},"file":"{u}","chat":{{"id":{}}},"company":{{"id":1}}}}"#, i % 50))
        .collect();
    let http = reqwest::Client::new();
    let started = Instant::now();
    for chunk in events.chunks(50) {
        let body = format!(r#"{{"time":1,"token":"bench","messages":{{"receivedMessage":[{}]}}}}"#, chunk.join(","));
        let r = http.post(format!("http://{}/webhooks/huggy", d.http_addr)).body(body).send().await?;
        anyhow::ensure!(r.status().is_success(), "webhook answered {}", r.status());
    }
    while counter_sum(&d.metrics.events_published) < args.files as u64 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "not all published in 10 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let bridge = started.elapsed();
    let stored = d.metrics.file_downloads.with_label_values(&["stored"]).get();
    d.shutdown();
    d.wait().await?;

    let seq_dir = dir.join("sequential");
    tokio::fs::create_dir_all(&seq_dir).await?;
    let started = Instant::now();
    for (i, u) in urls.iter().enumerate() {
        let resp = http.get(u).send().await?.error_for_status()?;
        let mut out = tokio::fs::File::create(seq_dir.join(i.to_string())).await?;
        let mut hasher = Sha256::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        let _ = hasher.finalize();
    }
    let sequential = started.elapsed();
    let _ = std::fs::remove_dir_all(&dir);

    let mb = total as f64 / 1e6;
    println!(
        "files: {}, {:.1} MB total ({}–{} KiB), bridge concurrency {}",
        args.files, mb, args.min_kib, args.max_kib, args.concurrency
    );
    println!(
        "    bridge burst: {:>8.2} s  {:>7.1} files/s  {:>7.1} MB/s  (webhook → stored → published with bridge_files; {stored} stored)",
        bridge.as_secs_f64(),
        args.files as f64 / bridge.as_secs_f64(),
        mb / bridge.as_secs_f64()
    );
    println!(
        "      sequential: {:>8.2} s  {:>7.1} files/s  {:>7.1} MB/s  (plain GET → file + sha256, one after another)",
        sequential.as_secs_f64(),
        args.files as f64 / sequential.as_secs_f64(),
        mb / sequential.as_secs_f64()
    );
    Ok(())
}
