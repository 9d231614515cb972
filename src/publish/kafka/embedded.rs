//! The embedded development broker: librdkafka's mock cluster with the routable topics, for
//! `kafka.embedded` only.

use rdkafka::error::KafkaError;
use tracing::warn;

use super::routable_topics;
use crate::config::Config;

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EmbeddedBrokerError {
    /// The thread that owns the cluster could not be started.
    #[error("cannot start the embedded broker's thread")]
    Thread(#[from] std::io::Error),
    /// librdkafka could not create the mock cluster.
    #[error("embedded broker failed")]
    Cluster(#[source] KafkaError),
    /// A routable topic could not be created on it.
    #[error("embedded broker failed: creating {topic}")]
    Topic {
        /// The topic.
        topic: String,
        /// Why.
        #[source]
        source: KafkaError,
    },
    /// The cluster's thread ended without saying whether the broker started.
    #[error("embedded broker failed: its thread ended before the broker was ready")]
    Gone(#[from] std::sync::mpsc::RecvError),
}

/// The embedded development broker: librdkafka's mock cluster, owned by a thread of its own for the
/// life of the process (the cluster is not `Send`).
pub(crate) struct EmbeddedBroker {
    pub(crate) bootstrap: String,
    stop: std::sync::mpsc::Sender<()>,
}

impl EmbeddedBroker {
    /// Starts the mock cluster and creates the routable topics on it.
    ///
    /// # Errors
    /// librdkafka could not create the cluster or its topics, or its thread could not start.
    pub(crate) fn start(cfg: &Config) -> Result<EmbeddedBroker, EmbeddedBrokerError> {
        let topics = routable_topics(cfg);
        let partitions = cfg.kafka.partitions;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<String, EmbeddedBrokerError>>();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new().name("embedded-kafka".into()).spawn(move || {
            let cluster = match rdkafka::mocking::MockCluster::new(1) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(EmbeddedBrokerError::Cluster(e)));
                    return;
                }
            };
            for t in &topics {
                if let Err(source) = cluster.create_topic(t, partitions, 1) {
                    let _ = ready_tx.send(Err(EmbeddedBrokerError::Topic { topic: t.clone(), source }));
                    return;
                }
            }
            let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
            let _ = stop_rx.recv();
            drop(cluster);
        })?;
        let bootstrap = ready_rx.recv()??;
        warn!(
            bootstrap = %bootstrap,
            "EMBEDDED KAFKA BROKER (development only): attach any Kafka client to {bootstrap}; nothing it holds survives a restart"
        );
        Ok(EmbeddedBroker { bootstrap, stop })
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.stop.send(());
    }
}
