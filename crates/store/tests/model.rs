//! Random sequences of transactions (and restarts) against `SqliteStore` and
//! a `BTreeMap` model of etcd's semantics must give identical results:
//! txn outcomes, revisions, values, create/mod revisions, versions, ranges
//! and watch events.

use std::collections::BTreeMap;

use kumo_store::{Compare, KeyValue, Op, Order, SqliteStore, Store, TxnResult, WatchEvent};
use proptest::prelude::*;
use tokio::sync::mpsc::UnboundedReceiver;

/// Keys chosen to share prefixes and to hit the edges of the prefix-end
/// computation (NUL, the last code point, the one before the surrogates).
const KEYS: &[&str] = &[
    "a",
    "a/",
    "a/b",
    "a/c",
    "ab",
    "b",
    "b/\u{0}",
    "b/\u{0}x",
    "\u{D7FF}",
    "\u{E000}",
    "\u{10FFFF}",
    "\u{10FFFF}\u{10FFFF}",
    "é",
];

const PREFIXES: &[&str] = &[
    "",
    "a",
    "a/",
    "b/",
    "b/\u{0}",
    "\u{D7FF}",
    "\u{10FFFF}",
    "é",
    "z",
];

#[derive(Debug, Default)]
struct Model {
    kvs: BTreeMap<String, KeyValue>,
    revision: i64,
}

impl Model {
    fn mod_revision(&self, key: &str) -> i64 {
        self.kvs.get(key).map_or(0, |kv| kv.mod_revision)
    }

    fn holds(&self, compare: &Compare) -> bool {
        match compare {
            Compare::ModRevision { key, revision } => self.mod_revision(key) == *revision,
            Compare::Absent(key) => !self.kvs.contains_key(key),
            Compare::Present(key) => self.kvs.contains_key(key),
        }
    }

    fn txn(
        &mut self,
        compares: &[Compare],
        success: &[Op],
        failure: &[Op],
    ) -> (TxnResult, Vec<WatchEvent>) {
        let succeeded = compares.iter().all(|c| self.holds(c));
        let ops = if succeeded { success } else { failure };
        let rev = self.revision + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    let kv = self.kvs.entry(key.clone()).or_insert_with(|| KeyValue {
                        key: key.clone(),
                        value: vec![],
                        create_revision: rev,
                        mod_revision: rev,
                        version: 0,
                    });
                    kv.value = value.clone();
                    kv.mod_revision = rev;
                    kv.version += 1;
                    events.push(WatchEvent::Put(kv.clone()));
                }
                Op::Delete { key } => {
                    if self.kvs.remove(key).is_some() {
                        events.push(WatchEvent::Delete {
                            key: key.clone(),
                            mod_revision: rev,
                        });
                    }
                }
                Op::DeletePrefix { prefix } => {
                    let keys: Vec<String> = self
                        .kvs
                        .keys()
                        .filter(|k| k.starts_with(prefix.as_str()))
                        .cloned()
                        .collect();
                    for key in keys {
                        self.kvs.remove(&key);
                        events.push(WatchEvent::Delete {
                            key,
                            mod_revision: rev,
                        });
                    }
                }
            }
        }
        if !events.is_empty() {
            self.revision = rev;
        }
        (
            TxnResult {
                succeeded,
                revision: self.revision,
            },
            events,
        )
    }

    fn range(&self, prefix: &str) -> Vec<KeyValue> {
        self.kvs
            .values()
            .filter(|kv| kv.key.starts_with(prefix))
            .cloned()
            .collect()
    }
}

/// A compare whose revision may be resolved against the current state, so
/// that successful CAS compares are common.
#[derive(Debug, Clone)]
enum CompareSpec {
    ModRevisionCurrent(&'static str),
    ModRevision(&'static str, i64),
    Absent(&'static str),
    Present(&'static str),
}

impl CompareSpec {
    fn resolve(&self, model: &Model) -> Compare {
        match *self {
            CompareSpec::ModRevisionCurrent(key) => Compare::ModRevision {
                key: key.into(),
                revision: model.mod_revision(key),
            },
            CompareSpec::ModRevision(key, revision) => Compare::ModRevision {
                key: key.into(),
                revision,
            },
            CompareSpec::Absent(key) => Compare::Absent(key.into()),
            CompareSpec::Present(key) => Compare::Present(key.into()),
        }
    }
}

#[derive(Debug, Clone)]
enum Action {
    Txn {
        compares: Vec<CompareSpec>,
        success: Vec<Op>,
        failure: Vec<Op>,
    },
    /// Drop the store and open the file again.
    Reopen,
}

fn key() -> impl Strategy<Value = &'static str> {
    prop::sample::select(KEYS)
}

fn prefix() -> impl Strategy<Value = &'static str> {
    prop::sample::select(PREFIXES)
}

fn compare() -> impl Strategy<Value = CompareSpec> {
    prop_oneof![
        3 => key().prop_map(CompareSpec::ModRevisionCurrent),
        2 => (key(), 0..6i64).prop_map(|(k, r)| CompareSpec::ModRevision(k, r)),
        1 => key().prop_map(CompareSpec::Absent),
        1 => key().prop_map(CompareSpec::Present),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (key(), prop::collection::vec(any::<u8>(), 0..4)).prop_map(|(k, value)| Op::Put {
            key: k.into(),
            value,
        }),
        3 => key().prop_map(|k| Op::Delete { key: k.into() }),
        1 => prefix().prop_map(|p| Op::DeletePrefix { prefix: p.into() }),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        12 => (
            prop::collection::vec(compare(), 0..3),
            prop::collection::vec(op(), 0..4),
            prop::collection::vec(op(), 0..3),
        )
            .prop_map(|(compares, success, failure)| Action::Txn {
                compares,
                success,
                failure,
            }),
        1 => Just(Action::Reopen),
    ]
}

struct Watchers {
    rxs: Vec<(&'static str, UnboundedReceiver<WatchEvent>)>,
    /// Expected events per watcher, from the model.
    expected: Vec<Vec<WatchEvent>>,
}

impl Watchers {
    fn register(store: &SqliteStore) -> Self {
        Watchers {
            rxs: PREFIXES.iter().map(|p| (*p, store.watch(p))).collect(),
            expected: vec![Vec::new(); PREFIXES.len()],
        }
    }

    fn expect(&mut self, events: &[WatchEvent]) {
        for ((prefix, _), expected) in self.rxs.iter().zip(&mut self.expected) {
            expected.extend(
                events
                    .iter()
                    .filter(|e| e.key().starts_with(prefix))
                    .cloned(),
            );
        }
    }

    fn check(mut self) -> Result<(), TestCaseError> {
        for ((prefix, rx), expected) in self.rxs.iter_mut().zip(self.expected) {
            let mut got = Vec::new();
            while let Ok(ev) = rx.try_recv() {
                got.push(ev);
            }
            prop_assert_eq!(got, expected, "watch events under prefix {:?}", prefix);
        }
        Ok(())
    }
}

async fn run(actions: Vec<Action>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let mut store = SqliteStore::open(&path).unwrap();
    let mut watchers = Watchers::register(&store);
    let mut model = Model::default();

    for action in actions {
        match action {
            Action::Txn {
                compares,
                success,
                failure,
            } => {
                let compares: Vec<Compare> = compares.iter().map(|c| c.resolve(&model)).collect();
                let (want, events) = model.txn(&compares, &success, &failure);
                watchers.expect(&events);
                let got = store.txn(compares, success, failure).await.unwrap();
                prop_assert_eq!(got, want);
            }
            Action::Reopen => {
                watchers.check()?;
                drop(store);
                store = SqliteStore::open(&path).unwrap();
                watchers = Watchers::register(&store);
            }
        }
        prop_assert_eq!(store.revision().await.unwrap(), model.revision);
        prop_assert_eq!(store.range("").await.unwrap(), model.range(""));
    }

    for prefix in PREFIXES {
        prop_assert_eq!(
            store.range(prefix).await.unwrap(),
            model.range(prefix),
            "range {:?}",
            prefix
        );
    }
    for key in KEYS {
        prop_assert_eq!(store.get(key).await.unwrap(), model.kvs.get(*key).cloned());
    }
    for prefix in PREFIXES {
        let all = model.range(prefix);
        // Limit 2 cuts most ranges short; 100 reads all of any range here.
        let pages = KEYS.iter().map(|k| (Some(*k), 2));
        for (after, limit) in pages.chain([(None, 0), (None, 2), (None, 100)]) {
            let up: Vec<KeyValue> = all
                .iter()
                .filter(|kv| after.is_none_or(|a| kv.key.as_str() > a))
                .take(limit)
                .cloned()
                .collect();
            let down: Vec<KeyValue> = all
                .iter()
                .rev()
                .filter(|kv| after.is_none_or(|a| kv.key.as_str() < a))
                .take(limit)
                .cloned()
                .collect();
            for (order, want) in [(Order::Ascending, up), (Order::Descending, down)] {
                prop_assert_eq!(
                    store.range_page(prefix, after, limit, order).await.unwrap(),
                    want,
                    "range_page {:?} after {:?} limit {} {:?}",
                    prefix,
                    after,
                    limit,
                    order
                );
            }
        }
    }
    watchers.check()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn sqlite_matches_model(actions in prop::collection::vec(action(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(run(actions))?;
    }
}
