//! Whether Kafka is reachable, kept true to reality in the background (stage `kafka_probe`):
//! readiness in kafka ack mode depends on it, and the publisher and the alerts read it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::kafka;
use super::Publisher;
use crate::health::{Health, KafkaHealth};

/// Keeps `KafkaHealth::reachable` true to reality every two seconds — librdkafka's broker states,
/// else a metadata request for one topic (`probe`: the topic and the request's timeout) — replaces a
/// producer that failed fatally, and refreshes the state gauges at the same pace.
pub(crate) async fn watch_kafka(
    publisher: Arc<Publisher>,
    kafka_health: Arc<KafkaHealth>,
    health: Arc<Health>,
    probe: (String, Duration),
    stop: CancellationToken,
) {
    let mut was = None;
    loop {
        // A producer that failed fatally is replaced here too, not only when there is work: in kafka
        // ack mode a replica that is not ready gets no requests that would replace it.
        publisher.heal().await;
        let (p, h, (topic, timeout)) = (publisher.clone(), kafka_health.clone(), probe.clone());
        let ok = tokio::task::spawn_blocking(move || kafka::probe_reachable(&p.producer(), &h, &topic, timeout))
            .await
            .unwrap_or(false);
        kafka_health.reachable.store(ok, std::sync::atomic::Ordering::Relaxed);
        if was != Some(ok) {
            if ok {
                info!("kafka reachable");
            } else {
                warn!(
                    reason = kafka_health.last_error().as_deref().unwrap_or("no broker answered"),
                    "kafka unreachable"
                );
            }
            was = Some(ok);
        }
        health.refresh_gauges();
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.cancelled() => break,
        }
    }
}
