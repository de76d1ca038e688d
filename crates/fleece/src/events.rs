//! Daemon events, fanned out to `GET /v1/events` subscribers.

use serde_json::Value;
use tokio::sync::broadcast;

/// One event: a kind (`snapshot_created`, ...) and a JSON body.
#[derive(Clone, Debug)]
pub struct Event {
    /// Event name, sent as the SSE `event:` field.
    pub kind: &'static str,
    /// Sent as the SSE `data:` field.
    pub data: Value,
}

/// Publisher side. Sending never blocks the data path: slow subscribers lose
/// old events (and are told so) rather than stall the daemon.
#[derive(Clone, Debug)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(1024).0,
        }
    }
}

impl Events {
    /// Publishes an event and logs it.
    pub fn emit(&self, kind: &'static str, data: Value) {
        tracing::info!(event = kind, %data, "event");
        let _ = self.tx.send(Event { kind, data });
    }

    /// A new subscription, starting from now.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
