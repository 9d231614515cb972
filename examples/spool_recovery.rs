//! How long a restart takes on a full spool, and what memory recovery needs.
//!
//! ```text
//! cargo run --release --example spool_recovery -- --gib 1
//! ```
//!
//! Builds a spool of about `--gib` GiB on disk through the library API: batches of the published
//! Huggy examples (a received message, an agent message, a workflow step; every event made unique)
//! parsed and split as the webhook does, appended and synced group by group, with every
//! `--acked-every`-th event acknowledged as if Kafka had taken it, so the spool holds delivered and
//! undelivered events mixed in every segment. Then it closes the spool and runs itself again with
//! `--recover <dir>`: that fresh process opens the spool (recovery: reading every frame, rebuilding
//! the undelivered index and the dedup window) and reports the time `Spool::open` took, its peak RSS
//! (`VmHWM`) before and after, and what recovery found. One line of figures at the end.
//!
//! `--small` builds the backlog that costs recovery the most memory per byte of disk: one tiny
//! event per batch (`{"id":N,"chat":{"id":…}}`), millions of them; `--dedup-window-secs 0` leaves the
//! dedup window out of the figure, so that what remains is what the spool itself keeps:
//!
//! ```text
//! cargo run --release --example spool_recovery -- --gib 0.35 --small --acked-every 0 --dedup-window-secs 0
//! ```
//!
//! `--with-files` gives every event a file to capture (a Huggy URL with its access token, 330
//! bytes) and records the results of one in `--done-every`: the backlog of a long Kafka outage
//! during file-heavy traffic, whose file work recovery must not hold whole:
//!
//! ```text
//! cargo run --release --example spool_recovery -- --gib 0.35 --small --with-files --acked-every 0 --dedup-window-secs 0
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use huggy_bridge::clock::now_secs;
use huggy_bridge::config::SpoolConfig;
use huggy_bridge::event::{parse_body, split, Body, Event, Sender};
use huggy_bridge::spool::{Spool, SpoolSettings};

const FIXTURES: &[&str] = &[
    include_str!("../tests/fixtures/receivedMessage.json"),
    include_str!("../tests/fixtures/sentAllMessage.json"),
    include_str!("../tests/fixtures/updatedWorkflowStep.json"),
];
/// Events appended per call: one write group, one `fdatasync`.
const EVENTS_PER_APPEND: usize = 3000;

#[derive(Parser, Debug)]
#[command(about = "Builds a spool of the given size, then measures its recovery in a fresh process")]
struct Args {
    /// Size of the spool on disk to build, in GiB (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// Acknowledge one event in this many (0: none).
    #[arg(long, default_value_t = 2)]
    acked_every: u64,
    /// Tiny events (about 30 bytes each) instead of the published examples.
    #[arg(long)]
    small: bool,
    /// Every event has a file to capture.
    #[arg(long)]
    with_files: bool,
    /// With `--with-files`: the files of one event in this many are done (0: none).
    #[arg(long, default_value_t = 2)]
    done_every: u64,
    /// `spool.dedup_window_secs` for building and recovering (0: no dedup window).
    #[arg(long, default_value_t = SpoolConfig::default().dedup_window_secs)]
    dedup_window_secs: u64,
    /// Directory to build the spool in (default: a new temporary directory, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Open the spool in this directory, print the recovery figures as JSON and exit (the child).
    #[arg(long, hide = true)]
    recover: Option<PathBuf>,
}

fn target_bytes(gib: f64) -> u64 {
    (gib * 1024.0 * 1024.0 * 1024.0) as u64
}

/// `spool.max_bytes` for a spool of `target` bytes: room for it with margin, so it never refuses.
fn max_bytes_for(target: u64) -> u64 {
    target.saturating_mul(2) + 64 * 1024 * 1024
}

fn vm_hwm_kib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")
}

/// A file URL as Huggy sends it since November 2025: its access token in the query (330 bytes).
fn huggy_url(a: u64, b: usize) -> String {
    let token: String = format!("{a:016x}{b:016x}").repeat(7);
    format!("https://media.huggy.app/files/{a}/{b}/comprovante-pagamento.pdf?X-Amz-Expires=600&X-Amz-Signature={token}")
}

/// A batch of one tiny receivedMessage, split around the place its unique id goes.
fn small_template() -> Vec<String> {
    let batch = r#"{"time":1700000000,"token":"bench","messages":{"receivedMessage":[{"id":@N@,"chat":{"id":1}}]}}"#;
    batch.split("@N@").map(str::to_owned).collect()
}

/// The batch as one JSON text split around the places each event's unique `bench_n` goes.
fn batch_template() -> anyhow::Result<Vec<String>> {
    let mut messages = serde_json::Map::new();
    let mut first: Option<serde_json::Value> = None;
    for text in FIXTURES {
        let v: serde_json::Value = serde_json::from_str(text).context("fixture is JSON")?;
        for (event_type, events) in v["messages"].as_object().context("fixture has messages")? {
            let list = messages.entry(event_type.clone()).or_insert_with(|| serde_json::Value::Array(Vec::new()));
            for event in events.as_array().context("an event list")? {
                let mut with_n = serde_json::Map::new();
                with_n.insert("bench_n".into(), "@N@".into());
                with_n.extend(event.as_object().context("an event object")?.clone());
                if let serde_json::Value::Array(l) = list {
                    l.push(with_n.into());
                }
            }
        }
        first.get_or_insert(v);
    }
    let first = first.context("no fixtures")?;
    let batch = serde_json::json!({"time": first["time"], "token": first["token"], "messages": messages});
    Ok(serde_json::to_string(&batch)?.split("@N@").map(str::to_owned).collect())
}

/// Events of one batch, parsed and split as the webhook does.
fn batch_events(template: &[String], n: u64, received_at: i64) -> anyhow::Result<Vec<Event>> {
    let n = n.to_string();
    let body = template.join(&n);
    let Body::Batch(batch) = parse_body(body.as_bytes())? else { bail!("the benchmark body is not a batch") };
    // The webhook's sender for a token not bound to an account.
    Ok(split(&batch, &Sender::token("benchmark"), received_at))
}

async fn build(dir: &Path, target: u64, args: &Args) -> anyhow::Result<(u64, u64, f64)> {
    let acked_every = args.acked_every;
    let template = if args.small { small_template() } else { batch_template()? };
    let (spool, followers) =
        Spool::open(SpoolSettings::new(dir.to_path_buf(), max_bytes_for(target), args.dedup_window_secs))?;
    let started = Instant::now();
    let (mut batches, mut appended, mut acked) = (0u64, 0u64, 0u64);
    while spool.stats().disk_bytes < target {
        let received_at = now_secs();
        let mut events = Vec::with_capacity(EVENTS_PER_APPEND);
        while events.len() < EVENTS_PER_APPEND {
            events.extend(batch_events(&template, batches, received_at)?);
            batches += 1;
        }
        if args.with_files {
            for (i, e) in events.iter_mut().enumerate() {
                e.set_files(vec![huggy_url(batches, i)]);
            }
        }
        let result = spool.append(events, received_at).await?;
        let seqs: Vec<u64> = result.seqs.into_iter().flatten().collect();
        appended += seqs.len() as u64;
        if args.with_files && args.done_every > 0 {
            for &seq in seqs.iter().filter(|s| *s % args.done_every == 0) {
                followers
                    .capture
                    .record(seq, format!(r#"[{{"url":"{}","status":"stored"}}]"#, huggy_url(seq, 0)).into_bytes())
                    .await;
            }
        }
        if acked_every > 0 {
            let to_ack: Vec<u64> = seqs.into_iter().filter(|s| s % acked_every == 0).collect();
            acked += to_ack.len() as u64;
            followers.publish.ack(to_ack).await;
        }
    }
    spool.close().await;
    Ok((appended, acked, started.elapsed().as_secs_f64()))
}

/// The child: open the spool, report as one JSON object on stdout.
async fn recover(dir: &Path, max_bytes: u64, dedup_window_secs: u64) -> anyhow::Result<()> {
    let before_kib = vm_hwm_kib()?;
    let started = Instant::now();
    let (spool, _followers) = Spool::open(SpoolSettings::new(dir.to_path_buf(), max_bytes, dedup_window_secs))?;
    let open_ms = started.elapsed().as_secs_f64() * 1000.0;
    let after_kib = vm_hwm_kib()?;
    let stats = spool.stats();
    let report = spool.recovery_report().clone();
    spool.close().await;
    println!(
        "{}",
        serde_json::json!({
            "open_ms": open_ms,
            "hwm_before_kib": before_kib,
            "hwm_after_kib": after_kib,
            "undelivered": stats.events,
            "undelivered_bytes": stats.bytes,
            "dedup_ids": stats.dedup_ids,
            "pending_files": stats.pending_files,
            "disk_bytes": stats.disk_bytes,
            "segments": stats.segments,
            "frames": report.frames,
            "bytes_read": report.bytes_read,
            "torn_tails": report.torn_tails,
            "damaged_regions": report.damaged_regions,
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if args.gib.is_nan() || args.gib <= 0.0 {
        bail!("--gib must be positive");
    }
    if let Some(dir) = &args.recover {
        return rt.block_on(recover(dir, max_bytes_for(target_bytes(args.gib)), args.dedup_window_secs));
    }
    let target = target_bytes(args.gib);
    let temp = tempfile::TempDir::new()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let (appended, acked, build_secs) = rt.block_on(build(&dir, target, &args))?;
    let out = Command::new(std::env::current_exe()?)
        .arg("--recover")
        .arg(&dir)
        .arg("--gib")
        .arg(args.gib.to_string())
        .arg("--dedup-window-secs")
        .arg(args.dedup_window_secs.to_string())
        .output()?;
    if !out.status.success() {
        bail!("recovery run failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).context("recovery figures")?;
    let mib = |k: &serde_json::Value| k.as_f64().unwrap_or(f64::NAN) / 1024.0;
    let delta_mib = mib(&r["hwm_after_kib"]) - mib(&r["hwm_before_kib"]);
    println!(
        "spool {:.2} GiB in {} segments ({} events appended, {} acked, built in {:.1} s): recovery {:.0} ms, \
         {:.2} GiB/s, peak RSS {:.1} MiB (+{:.1} MiB in Spool::open), {} undelivered events ({:.1} MiB), \
         {} dedup ids, {} events waiting for their files, {} frames, {} torn tails, {} damaged regions",
        r["disk_bytes"].as_f64().unwrap_or(f64::NAN) / (1u64 << 30) as f64,
        r["segments"],
        appended,
        acked,
        build_secs,
        r["open_ms"].as_f64().unwrap_or(f64::NAN),
        r["bytes_read"].as_f64().unwrap_or(f64::NAN)
            / (1u64 << 30) as f64
            / (r["open_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0),
        mib(&r["hwm_after_kib"]),
        delta_mib,
        r["undelivered"],
        r["undelivered_bytes"].as_f64().unwrap_or(f64::NAN) / (1u64 << 20) as f64,
        r["dedup_ids"],
        r["pending_files"],
        r["frames"],
        r["torn_tails"],
        r["damaged_regions"],
    );
    Ok(())
}
