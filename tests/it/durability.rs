//! What a 2xx promises, held against the failures SPEC §4a names — a client that hangs up, a disk
//! whose fdatasync fails or hangs, a flipped byte, a second daemon, a full spool — and the
//! operations around it (readiness through a broker outage, `spool status` and `spool drain` on a
//! stopped replica's volume). Real processes and a real broker where the failure is about them;
//! the daemon in-process where a fault has to be injected into its disk.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::common::*;
use huggy_bridge::app::{self, Overrides, Running};
use huggy_bridge::config::Config;
use huggy_bridge::metrics::counter_sum;
use huggy_bridge::spool::SegmentIo;
use tokio_util::sync::CancellationToken;

async fn status_of(admin: &SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{admin}/{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn bodies(recs: &[Rec]) -> Vec<String> {
    recs.iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.value).unwrap()["body"].as_str().unwrap_or("").to_owned()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A disk that can be made to fail or hang

/// Real I/O, except that `fdatasync` can be made to fail (the pages written since the file's last
/// good sync are dropped, as a kernel does after a failed writeback) or to hang until released.
#[derive(Default)]
struct Disk {
    fail_next: AtomicUsize,
    /// Syncs that found the disk hanging (the group is written and waits for its sync).
    hung: AtomicUsize,
    hang: Mutex<bool>,
    released: Condvar,
    synced: Mutex<std::collections::HashMap<i32, u64>>,
}

impl Disk {
    fn release(&self) {
        *self.hang.lock().unwrap() = false;
        self.released.notify_all();
    }
}

impl SegmentIo for Disk {
    fn sync_data(&self, file: &std::fs::File) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut hung = self.hang.lock().unwrap();
        if *hung {
            self.hung.fetch_add(1, Ordering::SeqCst);
        }
        while *hung {
            hung = self.released.wait(hung).unwrap();
        }
        drop(hung);
        let fd = file.as_raw_fd();
        if self.fail_next.load(Ordering::SeqCst) > 0 {
            self.fail_next.fetch_sub(1, Ordering::SeqCst);
            let keep = self.synced.lock().unwrap().get(&fd).copied().unwrap_or(0);
            file.set_len(keep)?;
            return Err(std::io::Error::from_raw_os_error(5));
        }
        file.sync_data()?;
        self.synced.lock().unwrap().insert(fd, file.metadata()?.len());
        Ok(())
    }
}

fn inprocess(dir: &std::path::Path, bootstrap: &str) -> Config {
    let mut cfg = inprocess_config(dir, &[LOAD_TOKEN]);
    cfg.kafka.brokers = bootstrap.to_owned();
    cfg
}

async fn start_with(cfg: Config, disk: &Arc<Disk>) -> Running {
    let io: Arc<dyn SegmentIo> = disk.clone();
    app::start_with(cfg, CancellationToken::new(), Overrides { spool_io: Some(io), ..Default::default() })
        .await
        .expect("daemon starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fdatasync_answers_503_and_nothing_acknowledged_is_lost() {
    let Some(bin) = real_broker_or_skip("failed_fdatasync") else { return };
    let tansu = Tansu::start(&bin, None);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    let disk = Arc::new(Disk::default());
    let d = start_with(inprocess(dir.path(), &tansu.bootstrap()), &disk).await;
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    let mut acked = Vec::new();
    let mut refused = 0;
    for b in 0..30 {
        if b == 10 || b == 20 {
            disk.fail_next.store(1, Ordering::SeqCst);
        }
        let (body, markers) = load_batch(1, b, 3);
        let (status, text) = post(&url, body).await;
        match status {
            200 => acked.extend(markers),
            503 => {
                assert!(text.contains("spool_unavailable"), "{text}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert_eq!(refused, 2, "exactly the two groups whose fdatasync failed are refused");
    d.shutdown();
    d.wait().await.unwrap();
    // Reopened on a healthy disk: everything answered 2xx is delivered, nothing refused is.
    let d = app::start(inprocess(dir.path(), &tansu.bootstrap()), CancellationToken::new()).await.unwrap();
    wait_for("spool drained", Duration::from_secs(60), async || (d.metrics.spool_events.get() == 0).then_some(()))
        .await;
    let got = bodies(&read_topics_async(&tansu.bootstrap(), &["huggy.receivedMessage"]).await);
    for m in &acked {
        assert!(got.contains(m), "acknowledged {m} missing");
    }
    assert_eq!(got.iter().filter(|g| g.contains("-b10-") || g.contains("-b20-")).count(), 0, "refused batches stored");
    d.shutdown();
    d.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_writer_fails_liveness_and_recovers_when_the_disk_does() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(Disk::default());
    let mut cfg = inprocess_config(dir.path(), &[LOAD_TOKEN]);
    cfg.spool.stall_timeout_secs = 1;
    let d = start_with(cfg, &disk).await;
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    assert_eq!(status_of(&d.admin_addr, "healthz").await.0, 200);
    *disk.hang.lock().unwrap() = true;
    let stuck = tokio::spawn(async move { post(&url, load_batch(1, 0, 2).0).await });
    let why = wait_for("liveness fails", Duration::from_secs(10), async || {
        let (code, body) = status_of(&d.admin_addr, "healthz").await;
        (code == 503).then_some(body)
    })
    .await;
    assert!(why.contains("spool writer"), "{why}");
    disk.release();
    assert_eq!(stuck.await.unwrap().0, 200, "the stuck request completes once the disk answers");
    wait_for("liveness recovers", Duration::from_secs(10), async || {
        (status_of(&d.admin_addr, "healthz").await.0 == 200).then_some(())
    })
    .await;
    d.shutdown();
    d.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_request_does_not_strand_its_files() {
    // A file host on loopback.
    let app = axum::Router::new().route("/files/{name}", axum::routing::get(|| async { vec![7u8; 5000] }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let files_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inprocess_config(dir.path(), &[LOAD_TOKEN]);
    cfg.files.enabled = true;
    cfg.files.allowed_url_prefixes = vec![format!("http://{files_addr}/files/")];
    cfg.files.store = format!("file://{}", dir.path().join("files").display());
    let disk = Arc::new(Disk::default());
    let d = start_with(cfg, &disk).await;
    let event = format!(
        r#"{{"id":1,"body":"arquivo","file":"http://{files_addr}/files/a.pdf","chat":{{"id":77}},"company":{{"id":"7"}}}}"#
    );
    let later = r#"{"id":2,"body":"depois","file":null,"chat":{"id":77},"company":{"id":"7"}}"#;
    let body = format!(r#"{{"time":1763700000,"token":"{LOAD_TOKEN}","messages":{{"receivedMessage":[{event}]}}}}"#);
    // The disk holds the group's fdatasync, so the request is still waiting for its answer when the
    // client goes away: the batch is written, and the handler is dropped before it learns so.
    *disk.hang.lock().unwrap() = true;
    let mut sock = std::net::TcpStream::connect(d.http_addr).unwrap();
    write!(
        sock,
        "POST /webhooks/huggy HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    wait_for("the batch's group waiting on its sync", Duration::from_secs(10), async || {
        (disk.hung.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    sock.shutdown(std::net::Shutdown::Both).unwrap();
    drop(sock);
    disk.release();
    // A later event of the same chat, sent properly, must not be stuck behind a stranded capture.
    let body2 = format!(r#"{{"time":1763700001,"token":"{LOAD_TOKEN}","messages":{{"receivedMessage":[{later}]}}}}"#);
    let url = format!("http://{}/webhooks/huggy", d.http_addr);
    // Nobody waits for the answer; the durable event alone gets its file captured and published.
    wait_for("the hung-up batch published", Duration::from_secs(20), async || {
        (counter_sum(&d.metrics.events_published) >= 1).then_some(())
    })
    .await;
    assert_eq!(post(&url, body2).await.0, 200);
    wait_for("both published", Duration::from_secs(30), async || {
        (counter_sum(&d.metrics.events_published) >= 2).then_some(())
    })
    .await;
    let recs = read_topics_async(d.embedded_bootstrap.as_deref().unwrap(), &["huggy.receivedMessage"]).await;
    let values: Vec<serde_json::Value> = recs.iter().map(|r| serde_json::from_slice(&r.value).unwrap()).collect();
    assert_eq!(values.len(), 2, "{values:?}");
    assert_eq!(values[0]["id"], 1, "order per chat kept");
    assert_eq!(values[0]["bridge_files"][0]["status"], "stored", "{}", values[0]);
    assert_eq!(values[1]["id"], 2);
    d.shutdown();
    d.wait().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Real processes, real broker

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_spool_exits_nonzero_and_the_first_keeps_delivering() {
    let Some(bin) = real_broker_or_skip("second_daemon") else { return };
    let tansu = Tansu::start(&bin, None);
    let dir = tempfile::tempdir().unwrap();
    topics_create(dir.path(), &tansu.bootstrap(), 3);
    let spool = dir.path().join("spool");
    let first = Daemon::start(dir.path(), &spool_config(&tansu.bootstrap(), &spool)).await;
    assert_eq!(post(&first.url(), load_batch(1, 0, 3).0).await.0, 200);
    let second_dir = tempfile::tempdir().unwrap();
    let second = spool_config(&tansu.bootstrap(), &spool)
        .set("http.listen", format!("127.0.0.1:{}", free_port()))
        .set("admin.listen", format!("127.0.0.1:{}", free_port()))
        .set("huggy.tokens", LOAD_TOKEN);
    let out = second.command(second_dir.path(), &["run"]).output().unwrap();
    assert!(!out.status.success(), "a second daemon on the same spool.dir must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another huggy-bridge process"), "{err}");
    // `spool status` refuses too, and changes nothing.
    let status = first.command(&["spool", "status"]).output().unwrap();
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("in use"), "{status:?}");
    assert_eq!(post(&first.url(), load_batch(1, 1, 3).0).await.0, 200);
    drained(&first, Duration::from_secs(30)).await;
    let got = bodies(&read_topics_async(&tansu.bootstrap(), &["huggy.receivedMessage"]).await);
    assert_eq!(got.len(), 6, "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_flipped_byte_in_the_newest_segment_costs_one_event_and_is_reported() {
    let Some(bin) = real_broker_or_skip("flipped_byte") else { return };
    let CuttableBroker { _tansu, proxy, via_proxy, dir } = cuttable_broker(&bin);
    proxy.cut();
    let spool = dir.path().join("spool");
    let cfg = spool_config(&via_proxy, &spool);
    let mut d = Daemon::start(dir.path(), &cfg).await;
    let mut sent = Vec::new();
    for b in 0..30 {
        let (body, markers) = load_batch(3, b, 1);
        assert_eq!(post(&d.url(), body).await.0, 200);
        sent.extend(markers);
    }
    d.kill9();
    let mut segments: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("segment-"))
        .collect();
    segments.sort();
    let newest = segments.last().unwrap().clone();
    // Flip one byte inside the body of event 10 (its marker is unique in the file).
    let mut bytes = std::fs::read(&newest).unwrap();
    let marker = b"c3-b10-e0";
    let at = bytes.windows(marker.len()).position(|w| w == marker).expect("event 10 in the newest segment");
    bytes[at + 2] ^= 0x01;
    std::fs::write(&newest, &bytes).unwrap();
    proxy.restore();
    let d = Daemon::start(dir.path(), &cfg).await;
    drained(&d, Duration::from_secs(60)).await;
    assert_eq!(d.metric("huggy_bridge_spool_damaged_frames_total").await, 1.0);
    let log = d.log_text();
    assert!(log.contains("damaged data inside a segment") && log.contains("events_lost=1"), "{log}");
    assert!(log.contains("kept aside"), "{log}");
    assert_eq!(std::fs::read_dir(spool.join("damaged")).unwrap().count(), 1);
    let got = bodies(&read_topics_async(&via_proxy, &["huggy.receivedMessage"]).await);
    let want: Vec<&String> = sent.iter().filter(|m| m.as_str() != "c3-b10-e0").collect();
    for m in &want {
        assert!(got.contains(m), "{m} missing after the damage");
    }
    assert!(!got.iter().any(|g| g == "c3-b10-e0"));
    // Order per chat holds for what was delivered.
    let firsts: Vec<&String> = got.iter().filter(|g| g.starts_with("c3-")).collect();
    assert_eq!(firsts, want, "delivered in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_refusal_a_smaller_batch_of_the_same_chat_cannot_overtake() {
    let Some(bin) = real_broker_or_skip("refusal_order") else { return };
    let CuttableBroker { _tansu, proxy, via_proxy, dir } = cuttable_broker(&bin);
    proxy.cut();
    let spool = dir.path().join("spool");
    // The smallest spool the configuration allows: max_body_bytes (4 MiB).
    let d = Daemon::start(dir.path(), &spool_config(&via_proxy, &spool).set("spool.max_bytes", 4_194_304)).await;
    let room =
        async || d.metric("huggy_bridge_spool_max_bytes").await - d.metric("huggy_bridge_spool_disk_bytes").await;
    // Fill chat 1's history until between 1 and 8 KiB are left: big batches first, then single events.
    let mut n = 0;
    while room().await > 24_000.0 {
        assert_eq!(post(&d.url(), load_batch(1, n, 50).0).await.0, 200);
        n += 1;
    }
    while room().await > 8_000.0 {
        assert_eq!(post(&d.url(), load_batch(1, n, 1).0).await.0, 200);
        n += 1;
    }
    let left = room().await;
    assert!(left > 1_000.0, "{left} bytes left");
    // A batch of 50 events (~17 KB) does not fit and is refused ...
    let refused = n;
    let (code, text) = post(&d.url(), load_batch(1, refused, 50).0).await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("spool_full"), "{text}");
    // ... and a later single event of the same chat, which would fit, must not overtake it.
    let (small, _) = load_batch(1, refused + 1, 1);
    let (code, text) = post(&d.url(), small.clone()).await;
    assert_eq!(code, 503, "a later batch overtook a refused one ({left} bytes were left): {text}");
    assert_eq!(status_of(&d.admin, "readyz").await.0, 503);
    // Kafka comes back, the spool drains, and Huggy's retries arrive in order.
    proxy.restore();
    drained(&d, Duration::from_secs(120)).await;
    wait_for("ready again", Duration::from_secs(20), async || {
        (status_of(&d.admin, "readyz").await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(post(&d.url(), load_batch(1, refused, 50).0).await.0, 200);
    assert_eq!(post(&d.url(), small).await.0, 200);
    drained(&d, Duration::from_secs(60)).await;
    let got = bodies(&read_topics_async(&via_proxy, &["huggy.receivedMessage"]).await);
    let refused_first = got.iter().position(|g| g == &format!("c1-b{refused}-e0")).unwrap();
    let small_at = got.iter().position(|g| g == &format!("c1-b{}-e0", refused + 1)).unwrap();
    assert!(refused_first < small_at, "the refused batch is published before the later one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_mode_stays_ready_through_a_broker_outage_and_delivers_after() {
    let Some(bin) = real_broker_or_skip("ready_through_outage") else { return };
    let CuttableBroker { _tansu, proxy, via_proxy, dir } = cuttable_broker(&bin);
    let d = Daemon::start(dir.path(), &spool_config(&via_proxy, &dir.path().join("spool"))).await;
    assert_eq!(status_of(&d.admin, "readyz").await.0, 200);
    proxy.cut();
    wait_for("kafka seen unreachable", Duration::from_secs(30), async || {
        (d.metric("huggy_bridge_kafka_connected").await == 0.0).then_some(())
    })
    .await;
    for b in 0..5 {
        assert_eq!(post(&d.url(), load_batch(2, b, 3).0).await.0, 200);
    }
    let (code, body) = status_of(&d.admin, "readyz").await;
    assert_eq!(code, 200, "spool mode rides out the outage: {body}");
    assert_eq!(status_of(&d.admin, "healthz").await.0, 200, "and is alive");
    proxy.restore();
    drained(&d, Duration::from_secs(60)).await;
    assert_eq!(read_topics_async(&via_proxy, &["huggy.receivedMessage"]).await.len(), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_status_and_drain_empty_a_stopped_replicas_volume() {
    let Some(bin) = real_broker_or_skip("spool_drain") else { return };
    let CuttableBroker { _tansu, proxy, via_proxy, dir } = cuttable_broker(&bin);
    proxy.cut();
    let spool = dir.path().join("spool");
    let mut d = Daemon::start(dir.path(), &spool_config(&via_proxy, &spool)).await;
    for b in 0..4 {
        assert_eq!(post(&d.url(), load_batch(4, b, 5).0).await.0, 200);
    }
    assert!(d.terminate(Duration::from_secs(20)).success());
    // The replica is gone; its volume holds 20 undelivered events.
    let out = d.command(&["spool", "status", "--json"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["undelivered_events"], 20, "{status}");
    assert_eq!(status["by_type"]["receivedMessage"], 20, "{status}");
    let text = d.command(&["spool", "status"]).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("undelivered events:  20"), "{text:?}");
    proxy.restore();
    let mut drain_cmd = d.command(&["spool", "drain"]);
    let drain = tokio::task::spawn_blocking(move || drain_cmd.output().unwrap()).await.unwrap();
    assert!(drain.status.success(), "{}", String::from_utf8_lossy(&drain.stderr));
    assert!(String::from_utf8_lossy(&drain.stdout).contains("drained 20 events"), "{drain:?}");
    let got = bodies(&read_topics_async(&via_proxy, &["huggy.receivedMessage"]).await);
    for b in 0..4 {
        for e in 0..5 {
            assert!(got.contains(&format!("c4-b{b}-e{e}")));
        }
    }
    let after: serde_json::Value =
        serde_json::from_slice(&d.command(&["spool", "status", "--json"]).output().unwrap().stdout).unwrap();
    assert_eq!(after["undelivered_events"], 0, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_spool_format_refuses_to_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let mut header = b"HUGGYSPL".to_vec();
    header.extend_from_slice(&7u32.to_le_bytes());
    header.extend_from_slice(&[0; 4]);
    std::fs::write(spool.join("segment-00000000000000000001.log"), &header).unwrap();
    let env = spool_config("embedded", &spool)
        .set("http.listen", format!("127.0.0.1:{}", free_port()))
        .set("admin.listen", format!("127.0.0.1:{}", free_port()))
        .set("huggy.tokens", "t");
    let out = env.command(dir.path(), &["run"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spool format 7") && err.contains("cannot read"), "{err}");
    assert_eq!(std::fs::read(spool.join("segment-00000000000000000001.log")).unwrap(), header, "left as it was");
}

/// Posts batches of 50 events of chat 1 from `*n` on, until one is refused; returns the markers of
/// the batches answered 200. The refused one's number is left in `*n`.
async fn fill_until_refused(d: &Daemon, n: &mut usize) -> Vec<String> {
    let mut acked = Vec::new();
    loop {
        let (body, markers) = load_batch(1, *n, 50);
        let (code, text) = post(&d.url(), body).await;
        match code {
            200 => acked.extend(markers),
            503 => {
                assert!(text.contains("spool_full"), "a full disk is answered spool_full: {text}");
                return acked;
            }
            other => panic!("unexpected {other}: {text}"),
        }
        *n += 1;
        assert!(*n < 10_000, "the disk never filled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_then_heals_by_itself_and_a_start_on_a_full_disk_drains() {
    let Some(bin) = real_broker_or_skip("full_disk") else { return };
    let Some(fs) = SmallFs::mount("full_disk", 4 * 1024 * 1024) else { return };
    let CuttableBroker { _tansu, proxy, via_proxy, dir } = cuttable_broker(&bin);
    let spool = fs.path.join("spool");
    // The cap is far above the filesystem: ENOSPC comes first, and one segment (4 MiB) is larger
    // than the disk, so the segment that failed must be deleted to make room.
    let env = spool_config(&via_proxy, &spool).set("spool.max_bytes", 64 * 1024 * 1024);
    proxy.cut();
    let mut d = Daemon::start(dir.path(), &env).await;
    let mut n = 0;
    let mut acked = fill_until_refused(&d, &mut n).await;
    assert!(!acked.is_empty());
    let (code, why) = status_of(&d.admin, "readyz").await;
    assert_eq!(code, 503, "not ready while the disk is full: {why}");
    assert!(why.contains("no room"), "{why}");
    let (small, small_markers) = load_batch(1, n + 1, 1);
    assert_eq!(post(&d.url(), small.clone()).await.0, 503, "every batch is refused until there is room");
    // Kafka returns: the spool delivers, deletes what was delivered and takes batches again by
    // itself, without a restart and without a batch to try with.
    proxy.restore();
    let restored = std::time::Instant::now();
    drained(&d, Duration::from_secs(120)).await;
    wait_for("ready again", Duration::from_secs(30), async || {
        (status_of(&d.admin, "readyz").await.0 == 200).then_some(())
    })
    .await;
    eprintln!("full_disk: healed {:?} after Kafka returned", restored.elapsed());
    let (refused, refused_markers) = load_batch(1, n, 50);
    assert_eq!(post(&d.url(), refused).await.0, 200, "the refused batch is taken once there is room");
    acked.extend(refused_markers);
    assert_eq!(post(&d.url(), small).await.0, 200);
    acked.extend(small_markers);
    drained(&d, Duration::from_secs(60)).await;

    // Filled again, stopped, and the last free bytes taken by something else: the daemon still
    // starts, is not ready, drains what the spool holds and becomes ready when that made room.
    proxy.cut();
    n += 2;
    acked.extend(fill_until_refused(&d, &mut n).await);
    assert!(d.terminate(Duration::from_secs(30)).success());
    let filler = fs.fill();
    eprintln!("full_disk: {filler} bytes of filler took the rest of the disk");
    let d = Daemon::start(dir.path(), &env).await;
    let (code, why) = status_of(&d.admin, "readyz").await;
    assert_eq!(code, 503, "started on a full disk, not ready: {why}");
    assert!(why.contains("no room"), "{why}");
    assert!(d.metric("huggy_bridge_spool_events").await > 0.0, "it holds undelivered events");
    proxy.restore();
    let restored = std::time::Instant::now();
    drained(&d, Duration::from_secs(120)).await;
    wait_for("ready after a start on a full disk", Duration::from_secs(30), async || {
        (status_of(&d.admin, "readyz").await.0 == 200).then_some(())
    })
    .await;
    eprintln!("full_disk: a start on a full disk drained and was ready {:?} after Kafka returned", restored.elapsed());
    let (last, last_markers) = load_batch(1, n, 50);
    assert_eq!(post(&d.url(), last).await.0, 200);
    acked.extend(last_markers);
    drained(&d, Duration::from_secs(60)).await;

    let got = bodies(&read_topics_async(&via_proxy, &["huggy.receivedMessage"]).await);
    let missing: Vec<&String> = acked.iter().filter(|m| !got.contains(m)).collect();
    eprintln!("full_disk: {} events acknowledged to Huggy, {} records in Kafka", acked.len(), got.len());
    assert!(
        missing.is_empty(),
        "{} acknowledged events never reached Kafka: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}
