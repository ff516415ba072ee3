//! The event log: append-only, one store key per event, committed in the
//! same transaction as the change it describes.

use super::App;
use kumo_api::{Event, EventQuery};

impl App {
    /// The newest events matching the query, oldest first.
    pub async fn event_list(&self, q: &EventQuery) -> Vec<Event> {
        let limit = q.limit.unwrap_or(100).min(super::RECENT_EVENTS);
        let after = q.after.unwrap_or(0);
        let inv = self.inv.read().await;
        let mut out: Vec<Event> = inv
            .recent_events
            .iter()
            .rev()
            .take_while(|e| e.seq > after)
            .filter(|e| q.resource.as_ref().is_none_or(|r| *r == e.resource))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }
}
