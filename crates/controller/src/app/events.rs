//! The event log: append-only, one store key per event, committed in the
//! same transaction as the change it describes.

use super::App;
use crate::error::Result;
use kumo_api::{Event, EventQuery};

pub const PREFIX: &str = "events/";

pub fn key(seq: u64) -> String {
    format!("{PREFIX}{seq:020}")
}

impl App {
    pub async fn event_list(&self, q: &EventQuery) -> Result<Vec<Event>> {
        let limit = q.limit.unwrap_or(100).min(10_000);
        let after = q.after.unwrap_or(0);
        let mut out = Vec::new();
        for kv in self.store().range(PREFIX).await?.iter().rev() {
            let e: Event = serde_json::from_slice(&kv.value).map_err(crate::Error::internal)?;
            if e.seq <= after || out.len() >= limit {
                break;
            }
            if q.resource.as_ref().is_none_or(|r| *r == e.resource) {
                out.push(e);
            }
        }
        out.reverse();
        Ok(out)
    }
}
