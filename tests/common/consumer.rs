//! A consumer that reads topics to their end, and the records it returns.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// One record as a consumer sees it.
#[derive(Debug, Clone)]
pub struct Rec {
    pub topic: String,
    #[allow(dead_code, reason = "shown where a failure prints the record")]
    pub partition: i32,
    #[allow(dead_code, reason = "shown where a failure prints the record")]
    pub offset: i64,
    pub key: Option<String>,
    /// The record's CreateTime in Unix milliseconds (`None`: no timestamp, or LogAppendTime).
    pub timestamp: Option<i64>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Rec {
    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).map(String::as_str)
    }
}

/// Reads every record of `topics` from the beginning to the end of each partition (partition EOF;
/// no consumer group: partitions are assigned explicitly, one topic at a time).
pub fn read_topics(bootstrap: &str, topics: &[&str]) -> Vec<Rec> {
    topics.iter().flat_map(|t| read_topic(bootstrap, t)).collect()
}

/// [`read_topics`] from async code (the consumer blocks, so it runs on the blocking pool).
pub async fn read_topics_async(bootstrap: &str, topics: &[&str]) -> Vec<Rec> {
    let b = bootstrap.to_owned();
    let t: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || read_topics(&b, &t.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .expect("consumer task")
}

/// [`read_topics_async`] with extra consumer properties (TLS, SASL).
pub async fn read_topics_with_async(bootstrap: &str, extra: Vec<(String, String)>, topics: Vec<&str>) -> Vec<Rec> {
    let b = bootstrap.to_owned();
    let t: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || t.iter().flat_map(|t| read_topic_with(&b, &extra, t)).collect())
        .await
        .expect("consumer task")
}

fn read_topic(bootstrap: &str, topic: &str) -> Vec<Rec> {
    read_topic_with(bootstrap, &[], topic)
}

fn read_topic_with(bootstrap: &str, extra: &[(String, String)], topic: &str) -> Vec<Rec> {
    let mut cc = ClientConfig::new();
    for (k, v) in extra {
        cc.set(k, v);
    }
    let consumer: BaseConsumer = cc
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "huggy-bridge-tests")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("consumer");
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| t.error().is_none()) {
        for p in t.partitions() {
            tpl.add_partition_offset(t.name(), p.id(), Offset::Beginning).unwrap();
        }
    }
    let partitions = tpl.count();
    if partitions == 0 {
        return Vec::new();
    }
    consumer.assign(&tpl).expect("assign");
    let mut eof = std::collections::HashSet::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while eof.len() < partitions {
        assert!(
            Instant::now() < deadline,
            "reading {topic}: only {} of {partitions} partitions reached their end",
            eof.len()
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Rec {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    timestamp: match m.timestamp() {
                        rdkafka::Timestamp::CreateTime(ms) => Some(ms),
                        _ => None,
                    },
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                eof.insert(p);
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    out
}

/// Records of `topics` grouped by `ce_id`.
#[allow(dead_code, reason = "for the record-fidelity tests that join this binary")]
pub fn by_event_id(recs: &[Rec]) -> HashMap<String, Vec<Rec>> {
    let mut m: HashMap<String, Vec<Rec>> = HashMap::new();
    for r in recs {
        m.entry(r.header("ce_id").unwrap_or_default().to_owned()).or_default().push(r.clone());
    }
    m
}
