//! Publishing that survives a bug in publishing: a window whose publishing panics is published
//! again one event at a time, and an event that panics on its own — a poisoned event — is
//! dead-lettered with the panic as its reason, through a path that formats nothing of the event but
//! its id, instead of crashing the publisher again after every restart.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt as _;
use rdkafka::message::{Header, OwnedHeaders};
use tracing::error;

use super::kafka::{self, ErrorClass};
use super::{Outcome, Publisher, RetryReason};
use crate::event::Event;
use crate::panics::message as panic_message;

/// Events (by their value's bytes) whose publishing panics: a test seam set only through
/// `app::Overrides`, never from a request.
pub type Poison = Arc<dyn Fn(&[u8]) -> bool + Send + Sync>;

impl Publisher {
    /// Makes publishing the events `poison` matches panic, as a bug in publishing would.
    pub(crate) fn poisoned_by(mut self, poison: Poison) -> Self {
        self.poison = Some(poison);
        self
    }

    /// Panics on an event the test seam poisoned.
    pub(super) fn check_poison(&self, ev: &Event) {
        if self.poison.as_ref().is_some_and(|p| p(&ev.value)) {
            panic!("injected fault: publishing event {} panics", ev.id);
        }
    }

    /// [`Publisher::publish_all`], surviving a panic: the window is published again event by event
    /// (the events already written before the panic may be written twice: at least once), and each
    /// event whose publishing panics by itself is dead-lettered with the panic message.
    pub(crate) async fn publish_guarded(&self, events: &[&Event]) -> Vec<Outcome> {
        let first = match AssertUnwindSafe(self.publish_all(events)).catch_unwind().await {
            Ok(outcomes) => return outcomes,
            Err(panic) => panic_message(panic),
        };
        error!(records = events.len(), panic = %first, "publishing panicked; publishing the window one event at a time");
        let mut out = Vec::with_capacity(events.len());
        // Keys with an event that is to be retried: their later events are not sent behind it.
        let mut held_back: HashSet<&str> = HashSet::new();
        for ev in events {
            let key = ev.key.as_deref();
            if key.is_some_and(|k| held_back.contains(k)) {
                out.push(Outcome::Retry(RetryReason::Behind));
                continue;
            }
            let outcome = match AssertUnwindSafe(self.publish_all(&[ev])).catch_unwind().await {
                Ok(mut one) => one.pop().unwrap_or(Outcome::Retry(RetryReason::Closed)),
                Err(panic) => self.dead_letter_poisoned(ev, &panic_message(panic)).await,
            };
            if let (Outcome::Retry(_), Some(k)) = (&outcome, key) {
                held_back.insert(k);
            }
            out.push(outcome);
        }
        out
    }

    /// Sends a poisoned event to the dead-letter topic with its bytes, its id and why, and no
    /// header that needs the event's parsed attributes (formatting them may be what panicked).
    async fn dead_letter_poisoned(&self, ev: &Event, panic: &str) -> Outcome {
        let reason = format!("publishing this event panicked: {panic}");
        error!(event_id = %ev.id, event_type = %ev.event_type, panic, "poisoned event: dead-lettering it instead of retrying it");
        let producer = match self.usable_producer().await {
            Ok(p) => p,
            Err(why) => return Outcome::Retry(why),
        };
        let attempt = AssertUnwindSafe(async {
            let id = ev.id.to_string();
            let headers = OwnedHeaders::new_with_capacity(4)
                .insert(Header { key: "ce_id", value: Some(id.as_str()) })
                .insert(Header { key: "huggy_dlq_reason", value: Some(reason.as_str()) })
                .insert(Header { key: "huggy_dlq_topic", value: Some(self.routes.topic_for(&ev.event_type)) });
            self.deliver(&producer, &self.routes.dead_letter, ev, headers, &ev.value).await
        })
        .catch_unwind()
        .await;
        match attempt {
            Ok(Ok(())) => {
                self.metrics.events_dead_lettered.with_label_values(&[ev.event_type.label()]).inc();
                Outcome::DeadLettered
            }
            Ok(Err(e)) => Outcome::Retry(match kafka::classify(&e) {
                ErrorClass::Authorization => RetryReason::Authorization(e),
                ErrorClass::Fatal => RetryReason::Fatal(e),
                ErrorClass::Permanent | ErrorClass::Transient => RetryReason::DeadLetter(e),
            }),
            Err(again) => {
                let again = panic_message(again);
                error!(event_id = %ev.id, panic = %again, "dead-lettering the poisoned event panicked too; it is kept and tried again");
                Outcome::Retry(RetryReason::Panicked(again))
            }
        }
    }
}
