//! The event log: append-only, one store key per event, committed in the
//! same transaction as the change it describes.
//!
//! Every event has a sequence number, one more than the previous event's.
//! The newest [`RECENT_EVENTS`](super::RECENT_EVENTS) are kept in memory as well
//! (`Inventory::recent_events`); older ones are read from the store when a
//! reader's cursor is behind that window. A reader that passes each answer's
//! `next` back as `after` sees every event once, in order, however fast
//! events are written: a page is the *oldest* events after the cursor.

use super::records::{event_key, EVENTS};
use super::{App, Inventory};
use crate::error::Result;
use kumo_api::{ApiError, Event, EventPage, EventQuery};
use kumo_store::Order;
use std::time::Duration;
use tokio::time::Instant;

/// How many events an answer holds when the query gives no `limit`.
pub const DEFAULT_LIMIT: usize = 100;

impl App {
    /// Events matching the query, oldest first, and the cursor that
    /// continues after them.
    ///
    /// Without `after`: the newest `limit` matching events still in memory;
    /// `next` is the newest event's sequence number. With `after`: the oldest
    /// `limit` matching events past the cursor, from memory when the window
    /// reaches back to it, from the store otherwise. With `wait_seconds` too, an
    /// answer that would be empty waits up to that long for new events.
    ///
    /// Errors: `after` past the newest event, or `wait_seconds` without `after`
    /// (invalid input naming the parameter); the store's, or an event record
    /// it cannot decode.
    pub async fn event_list(&self, q: &EventQuery) -> Result<EventPage> {
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
        let resource = q.resource.as_deref();
        let Some(mut after) = q.after else {
            if q.wait_seconds.is_some() {
                return Err(ApiError::invalid(
                    "wait_seconds",
                    "waits for events past a cursor: give `after` too",
                )
                .into());
            }
            return Ok(self.inv.read().await.newest_events(resource, limit));
        };
        let deadline = Instant::now() + Duration::from_secs(q.wait_seconds.unwrap_or(0));
        // Subscribed before looking, so no commit falls between the look and the wait.
        let mut committed = self.event_committed.subscribe();
        loop {
            let page = self.events_after(after, resource, limit).await?;
            if !page.items.is_empty() || Instant::now() >= deadline {
                return Ok(page);
            }
            after = page.next;
            let newer = committed.wait_for(|&seq| seq > after);
            match tokio::time::timeout_at(deadline, newer).await {
                Ok(Ok(_)) => {}
                // Timed out, or the controller is shutting down.
                Ok(Err(_)) | Err(_) => {
                    return Ok(EventPage {
                        items: Vec::new(),
                        next: after,
                    })
                }
            }
        }
    }

    /// The oldest `limit` matching events past `after`.
    async fn events_after(
        &self,
        after: u64,
        resource: Option<&str>,
        limit: usize,
    ) -> Result<EventPage> {
        {
            let inv = self.inv.read().await;
            if after > inv.last_event {
                // Not a cursor this log gave out (another controller's?).
                return Err(ApiError::invalid(
                    "after",
                    format!("is past the newest event ({})", inv.last_event),
                )
                .into());
            }
            let first = inv
                .recent_events
                .front()
                .map_or(inv.last_event + 1, |e| e.seq);
            if after + 1 >= first {
                // Sequence numbers are consecutive, so the cursor's place
                // in the window is an offset.
                let start = usize::try_from(after + 1 - first).unwrap_or(usize::MAX);
                let window = inv
                    .recent_events
                    .range(start.min(inv.recent_events.len())..);
                return Ok(page(window, resource, limit, after));
            }
        }
        // Behind the window: every event there is committed and never
        // changes, so the store is read without holding the inventory.
        let kvs = self
            .store
            .range_page(EVENTS, Some(&event_key(after)), limit, Order::Ascending)
            .await?;
        let events = kvs
            .iter()
            .map(|kv| kv.json::<Event>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(events.iter(), resource, limit, after))
    }
}

/// Up to `limit` of `events` (those after the cursor, in order) that match
/// `resource`; `next` is the last one looked at.
fn page<'a>(
    events: impl Iterator<Item = &'a Event>,
    resource: Option<&str>,
    limit: usize,
    after: u64,
) -> EventPage {
    let mut items = Vec::new();
    let mut next = after;
    for e in events {
        next = e.seq;
        if resource.is_none_or(|r| r == e.resource) {
            items.push(e.clone());
            if items.len() == limit {
                break;
            }
        }
    }
    EventPage { items, next }
}

impl Inventory {
    /// The newest `limit` events in memory matching `resource`, oldest first.
    fn newest_events(&self, resource: Option<&str>, limit: usize) -> EventPage {
        let mut items: Vec<Event> = self
            .recent_events
            .iter()
            .rev()
            .filter(|e| resource.is_none_or(|r| r == e.resource))
            .take(limit)
            .cloned()
            .collect();
        items.reverse();
        EventPage {
            items,
            next: self.last_event,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::{Batch, RECENT_EVENTS};
    use kumo_store::StoreExt;
    use std::sync::Arc;

    async fn open(dir: &std::path::Path) -> Arc<App> {
        let config = crate::Config::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
        App::open(&config).await.unwrap()
    }

    /// Commit `count` events in transactions of `per_commit`; every third
    /// is about `vm/b`, the others about `vm/a`. The message is the event's
    /// number in this run.
    async fn write(app: &App, from: usize, count: usize, per_commit: usize) {
        let mut n = from;
        while n < from + count {
            let mut batch = Batch::default();
            for _ in 0..per_commit.min(from + count - n) {
                let resource = if n % 3 == 0 { "vm/b" } else { "vm/a" };
                batch.event("test.event", resource.into(), "default", n.to_string());
                n += 1;
            }
            let mut inv = app.inv.write().await;
            app.commit(&mut inv, batch).await.unwrap();
        }
    }

    /// Follow the log from `after` until `count` events arrived.
    async fn follow(app: &App, after: u64, resource: Option<&str>, count: usize) -> Vec<Event> {
        let mut seen = Vec::new();
        let mut q = EventQuery {
            after: Some(after),
            limit: Some(100),
            resource: resource.map(str::to_string),
            wait_seconds: Some(5),
        };
        while seen.len() < count {
            let page = app.event_list(&q).await.unwrap();
            assert!(page.items.len() <= 100);
            assert!(page.next >= q.after.unwrap());
            seen.extend(page.items);
            q.after = Some(page.next);
        }
        seen
    }

    fn numbers(events: &[Event]) -> Vec<usize> {
        events.iter().map(|e| e.message.parse().unwrap()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_sees_every_event_once_in_order_while_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let app = open(dir.path()).await;
        let start = app.inv.read().await.last_event;
        let writer = {
            let app = app.clone();
            tokio::spawn(async move {
                // Bursts of different sizes, so pages end mid-transaction.
                for (i, burst) in (0..10_000).step_by(500).enumerate() {
                    write(&app, burst, 500, 1 + i % 7).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        let seen = follow(&app, start, None, 10_000).await;
        writer.await.unwrap();
        assert_eq!(numbers(&seen), (0..10_000).collect::<Vec<_>>());
        let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (start + 1..=start + 10_000).collect::<Vec<_>>());
        // Nothing more: a follower at the end waits, then gets nothing.
        let q = EventQuery {
            after: Some(start + 10_000),
            wait_seconds: Some(1),
            ..Default::default()
        };
        let page = app.event_list(&q).await.unwrap();
        assert_eq!(page.items, []);
        assert_eq!(page.next, start + 10_000);
        // A cursor this log never gave out, and a wait without a cursor.
        let q = EventQuery {
            after: Some(start + 10_001),
            ..Default::default()
        };
        let e = app.event_list(&q).await.unwrap_err();
        assert!(
            matches!(e, crate::Error::Api(ref a) if a.field.as_deref() == Some("after")),
            "{e}"
        );
        let q = EventQuery {
            wait_seconds: Some(1),
            ..Default::default()
        };
        let e = app.event_list(&q).await.unwrap_err();
        assert!(
            matches!(e, crate::Error::Api(ref a) if a.field.as_deref() == Some("wait_seconds")),
            "{e}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cursor_behind_the_memory_window_reads_the_store_and_a_restart_loads_only_the_window()
    {
        let dir = tempfile::tempdir().unwrap();
        let app = open(dir.path()).await;
        let start = app.inv.read().await.last_event;
        let total = RECENT_EVENTS + 2_500;
        write(&app, 0, total, 500).await;
        let first_in_memory = app.inv.read().await.recent_events.front().unwrap().seq;
        assert!(
            first_in_memory > start + 2_500,
            "the walk must start in the store"
        );

        let all = follow(&app, start, None, total).await;
        assert_eq!(numbers(&all), (0..total).collect::<Vec<_>>());
        // A filtered follower skips the others, also across the boundary.
        let b = follow(&app, start, Some("vm/b"), total.div_ceil(3)).await;
        assert_eq!(numbers(&b), (0..total).step_by(3).collect::<Vec<_>>());
        // Without a cursor: the newest, oldest first, and where they end.
        let newest = app
            .event_list(&EventQuery {
                limit: Some(3),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(numbers(&newest.items), [total - 3, total - 2, total - 1]);
        assert_eq!(newest.next, start + total as u64);

        // Spoil the oldest event: a start that read the whole log would
        // fail on it; one that loads only the newest window does not.
        let spoiled = event_key(start + 1);
        app.store.put(&spoiled, b"not json".to_vec()).await.unwrap();
        drop(app);
        let app = open(dir.path()).await;
        {
            let inv = app.inv.read().await;
            assert_eq!(inv.recent_events.len(), RECENT_EVENTS);
            assert_eq!(inv.last_event, start + total as u64);
        }
        let after_spoiled = follow(&app, start + 1, None, total - 1).await;
        assert_eq!(numbers(&after_spoiled), (1..total).collect::<Vec<_>>());
        // The spoiled record is an error, not a skipped event.
        let q = EventQuery {
            after: Some(start),
            ..Default::default()
        };
        assert!(app.event_list(&q).await.is_err());
    }
}
