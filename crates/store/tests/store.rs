//! Behaviour of `SqliteStore` through the `Store` trait.

use std::sync::Arc;
use std::time::Instant;

use kumo_store::{
    Compare, Error, KeyValue, Op, SqliteStore, Store, StoreExt, TxnResult, WatchEvent,
};
use tokio::sync::mpsc::UnboundedReceiver;

fn put(key: &str, value: &[u8]) -> Op {
    Op::Put {
        key: key.into(),
        value: value.to_vec(),
    }
}

fn drain(rx: &mut UnboundedReceiver<WatchEvent>) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        events.push(ev);
    }
    events
}

fn del(key: &str, mod_revision: i64) -> WatchEvent {
    WatchEvent::Delete {
        key: key.into(),
        mod_revision,
    }
}

#[tokio::test]
async fn revisions_and_versions_follow_etcd() {
    let store = SqliteStore::in_memory().unwrap();
    assert_eq!(store.revision().await.unwrap(), 0);
    assert_eq!(store.get("a").await.unwrap(), None);

    assert_eq!(store.put("a", b"1".to_vec()).await.unwrap(), 1);
    assert_eq!(store.put("b", b"x".to_vec()).await.unwrap(), 2);
    assert_eq!(store.put("a", b"2".to_vec()).await.unwrap(), 3);
    assert_eq!(
        store.get("a").await.unwrap(),
        Some(KeyValue {
            key: "a".into(),
            value: b"2".to_vec(),
            create_revision: 1,
            mod_revision: 3,
            version: 2,
        })
    );

    // Deleting forgets the key's history; re-creating starts over.
    assert!(store.delete("a").await.unwrap());
    assert_eq!(store.revision().await.unwrap(), 4);
    assert_eq!(store.put("a", b"3".to_vec()).await.unwrap(), 5);
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1));
}

#[tokio::test]
async fn a_txn_that_changes_nothing_keeps_the_revision() {
    let store = SqliteStore::in_memory().unwrap();
    store.put("a", b"1".to_vec()).await.unwrap();

    assert!(!store.delete("missing").await.unwrap());
    let res = store
        .txn(
            vec![Compare::Present("a".into())],
            vec![Op::Delete {
                key: "missing".into(),
            }],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        res,
        TxnResult {
            succeeded: true,
            revision: 1
        }
    );
    let res = store.txn(vec![], vec![], vec![]).await.unwrap();
    assert_eq!(res.revision, 1);
    // A put of the same value is still a change, as in etcd.
    assert_eq!(store.put("a", b"1".to_vec()).await.unwrap(), 2);
}

#[tokio::test]
async fn txn_applies_success_or_failure_atomically_at_one_revision() {
    let store = SqliteStore::in_memory().unwrap();
    store.put("vms/1", b"a".to_vec()).await.unwrap();

    let res = store
        .txn(
            vec![
                Compare::Present("vms/1".into()),
                Compare::Absent("vms/2".into()),
                Compare::ModRevision {
                    key: "vms/1".into(),
                    revision: 1,
                },
            ],
            vec![put("vms/2", b"b"), put("vms/1", b"c"), put("vms/1", b"d")],
            vec![put("failed", b"")],
        )
        .await
        .unwrap();
    assert_eq!(
        res,
        TxnResult {
            succeeded: true,
            revision: 2
        }
    );
    let vms = store.range("vms/").await.unwrap();
    let summary: Vec<_> = vms
        .iter()
        .map(|kv| {
            (
                kv.key.as_str(),
                kv.value.as_slice(),
                kv.mod_revision,
                kv.version,
            )
        })
        .collect();
    // Ops run in order: two puts to vms/1 in one txn count as two versions.
    assert_eq!(
        summary,
        [("vms/1", &b"d"[..], 2, 3), ("vms/2", &b"b"[..], 2, 1)]
    );

    let res = store
        .txn(
            vec![Compare::Absent("vms/1".into())],
            vec![put("never", b"")],
            vec![Op::DeletePrefix {
                prefix: "vms/".into(),
            }],
        )
        .await
        .unwrap();
    assert_eq!(
        res,
        TxnResult {
            succeeded: false,
            revision: 3
        }
    );
    assert_eq!(store.range("").await.unwrap(), vec![]);
}

#[tokio::test]
async fn an_empty_key_is_refused_and_changes_nothing() {
    let store = SqliteStore::in_memory().unwrap();
    // Also in the branch that would not run.
    let err = store
        .txn(vec![], vec![put("a", b"1")], vec![put("", b"1")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EmptyKey), "{err:?}");
    let err = store.delete("").await.unwrap_err();
    assert!(matches!(err, Error::EmptyKey), "{err:?}");
    assert_eq!(store.revision().await.unwrap(), 0);
    assert_eq!(store.range("").await.unwrap(), vec![]);
}

#[tokio::test]
async fn range_is_sorted_and_exact_on_prefix_boundaries() {
    let store = SqliteStore::in_memory().unwrap();
    let keys = [
        "vms0",
        "vms/b",
        "vms",
        "vms/a/1",
        "vms/a",
        "vmt",
        "vm",
        "vms/\u{10FFFF}",
    ];
    for key in keys {
        store.put(key, vec![]).await.unwrap();
    }
    let range = |prefix: &'static str| {
        let store = store.clone();
        async move {
            let kvs = store.range(prefix).await.unwrap();
            kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        range("vms/").await,
        ["vms/a", "vms/a/1", "vms/b", "vms/\u{10FFFF}"]
    );
    assert_eq!(range("vms/a").await, ["vms/a", "vms/a/1"]);
    assert_eq!(
        range("vms").await,
        ["vms", "vms/a", "vms/a/1", "vms/b", "vms/\u{10FFFF}", "vms0"]
    );
    let mut all: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    all.sort();
    assert_eq!(range("").await, all);
    assert_eq!(range("x").await, Vec::<String>::new());
}

#[tokio::test]
async fn create_and_compare_and_put() {
    let store = SqliteStore::in_memory().unwrap();
    assert!(store.create("k", b"1".to_vec()).await.unwrap());
    assert!(!store.create("k", b"2".to_vec()).await.unwrap());
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"1");

    assert!(!store.compare_and_put("k", 0, b"x".to_vec()).await.unwrap());
    assert!(store.compare_and_put("k", 1, b"2".to_vec()).await.unwrap());
    assert!(!store.compare_and_put("k", 1, b"3".to_vec()).await.unwrap());
    assert!(store
        .compare_and_put("new", 0, b"n".to_vec())
        .await
        .unwrap());
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"2");
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Host {
    name: String,
    cpus: u32,
}

#[tokio::test]
async fn json_helpers_round_trip_and_name_the_key_on_errors() {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
    let h1 = Host {
        name: "h1".into(),
        cpus: 8,
    };
    assert!(store.create_json("hosts/h1", &h1).await.unwrap());
    assert!(!store.create_json("hosts/h1", &h1).await.unwrap());
    assert_eq!(store.get_json::<Host>("hosts/h1").await.unwrap(), Some(h1));
    assert_eq!(store.get_json::<Host>("hosts/none").await.unwrap(), None);

    store.put_json("hosts/h2", "not a host").await.unwrap();
    let kv = store.get("hosts/h2").await.unwrap().unwrap();
    assert_eq!(kv.json::<String>().unwrap(), "not a host");
    let err = store.get_json::<Host>("hosts/h2").await.unwrap_err();
    assert!(matches!(err, Error::Codec { .. }), "{err:?}");
    // The message names the key; the cause is in the chain, not repeated.
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(err.to_string().contains("hosts/h2"), "{err}");
    assert!(!err.to_string().contains(&source), "{err}");
}

#[tokio::test]
async fn state_and_revision_survive_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kumo.db");
    let before = {
        let store = SqliteStore::open(&path).unwrap();
        store.put("a", b"1".to_vec()).await.unwrap();
        store.put("a", b"2".to_vec()).await.unwrap();
        store.put("b/1", b"x".to_vec()).await.unwrap();
        store.put("gone", b"x".to_vec()).await.unwrap();
        // The revision must not fall back to the highest mod_revision.
        assert!(store.delete("gone").await.unwrap());
        assert_eq!(store.revision().await.unwrap(), 5);
        store.range("").await.unwrap()
    };

    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.revision().await.unwrap(), 5);
    assert_eq!(store.range("").await.unwrap(), before);
    assert_eq!(store.put("a", b"3".to_vec()).await.unwrap(), 6);
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 6, 3));
}

/// Two writers read the same mod_revision and race a CAS: exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_on_the_same_revision_has_one_winner() {
    let store = SqliteStore::in_memory().unwrap();
    store.put("leader", b"none".to_vec()).await.unwrap();
    for round in 0..50 {
        let seen = store.get("leader").await.unwrap().unwrap().mod_revision;
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let contenders: Vec<_> = ["x", "y"]
            .into_iter()
            .map(|name| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let res = store
                        .txn(
                            vec![Compare::ModRevision {
                                key: "leader".into(),
                                revision: seen,
                            }],
                            vec![put("leader", name.as_bytes())],
                            vec![],
                        )
                        .await
                        .unwrap();
                    (name, res)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in contenders {
            let (name, res) = task.await.unwrap();
            if res.succeeded {
                winners.push(name);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let leader = store.get("leader").await.unwrap().unwrap();
        assert_eq!(leader.value, winners[0].as_bytes());
        assert_eq!(leader.mod_revision, seen + 1);
    }
}

/// Read-modify-write loops from many tasks lose no update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_increments_from_many_tasks_lose_nothing() {
    const TASKS: u64 = 8;
    const INCREMENTS: u64 = 50;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().unwrap());
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..INCREMENTS {
                    loop {
                        let (n, rev) = match store.get("counter").await.unwrap() {
                            Some(kv) => (kv.json::<u64>().unwrap(), kv.mod_revision),
                            None => (0, 0),
                        };
                        let op = Op::put_json("counter", &(n + 1)).unwrap();
                        let compare = Compare::ModRevision {
                            key: "counter".into(),
                            revision: rev,
                        };
                        if store
                            .txn(vec![compare], vec![op], vec![])
                            .await
                            .unwrap()
                            .succeeded
                        {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let counter = store.get("counter").await.unwrap().unwrap();
    assert_eq!(counter.json::<u64>().unwrap(), TASKS * INCREMENTS);
    assert_eq!(counter.version as u64, TASKS * INCREMENTS);
    assert_eq!(store.revision().await.unwrap() as u64, TASKS * INCREMENTS);
}

#[tokio::test]
async fn watch_sees_later_changes_under_its_prefix_in_order() {
    let store = SqliteStore::in_memory().unwrap();
    store.put("vms/old", b"0".to_vec()).await.unwrap();
    let mut vms = store.watch("vms/");
    let mut all = store.watch("");

    store.put("vms/1", b"a".to_vec()).await.unwrap(); // 2
    store.put("hosts/1", b"h".to_vec()).await.unwrap(); // 3
    store.put("vms/1", b"b".to_vec()).await.unwrap(); // 4
    store.delete("vms/old").await.unwrap(); // 5
    store.delete("vms/old").await.unwrap(); // no change, no event
    store.put("vms/2", b"c".to_vec()).await.unwrap(); // 6
    store.put("vmsx", b"not under vms/".to_vec()).await.unwrap(); // 7
    store
        .txn(
            vec![],
            vec![Op::DeletePrefix {
                prefix: "vms/".into(),
            }],
            vec![],
        )
        .await
        .unwrap(); // 8

    let kv = |key: &str, value: &[u8], create: i64, rev: i64, version: i64| {
        WatchEvent::Put(KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: create,
            mod_revision: rev,
            version,
        })
    };
    assert_eq!(
        drain(&mut vms),
        [
            kv("vms/1", b"a", 2, 2, 1),
            kv("vms/1", b"b", 2, 4, 2),
            del("vms/old", 5),
            kv("vms/2", b"c", 6, 6, 1),
            del("vms/1", 8),
            del("vms/2", 8),
        ]
    );
    let revisions: Vec<i64> = drain(&mut all)
        .iter()
        .map(WatchEvent::mod_revision)
        .collect();
    assert_eq!(revisions, [2, 3, 4, 5, 6, 7, 8, 8]);
}

#[tokio::test]
async fn dropped_watchers_do_not_disturb_writers() {
    let store = SqliteStore::in_memory().unwrap();
    let gone = store.watch("");
    let mut kept = store.watch("");
    drop(gone);
    store.put("a", vec![]).await.unwrap();
    drop(kept.try_recv().unwrap());
    drop(kept);
    store.put("b", vec![]).await.unwrap();
    assert_eq!(store.revision().await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_and_watch_misses_and_repeats_nothing() {
    let store = SqliteStore::in_memory().unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..500 {
                store
                    .put(&format!("k/{:03}", i % 50), vec![])
                    .await
                    .unwrap();
            }
        })
    };
    tokio::task::yield_now().await;
    let mut snapshot = store.range_and_watch("k/").await.unwrap();
    writer.await.unwrap();

    // Replaying the events on the snapshot gives the final state, and every
    // event is newer than the snapshot.
    let mut state: std::collections::BTreeMap<String, KeyValue> = snapshot
        .kvs
        .into_iter()
        .map(|kv| (kv.key.clone(), kv))
        .collect();
    let mut last = snapshot.revision;
    for ev in drain(&mut snapshot.events) {
        assert_eq!(ev.mod_revision(), last + 1);
        last = ev.mod_revision();
        match ev {
            WatchEvent::Put(kv) => {
                state.insert(kv.key.clone(), kv);
            }
            WatchEvent::Delete { key, .. } => {
                state.remove(&key);
            }
        }
    }
    assert_eq!(last, 500);
    let want: Vec<KeyValue> = state.into_values().collect();
    assert_eq!(store.range("k/").await.unwrap(), want);
}

/// Correctness of a range over 100,000 keys; prints how long it takes (the
/// query plan itself is checked by a unit test).
#[tokio::test]
async fn range_over_100k_keys() {
    let store = SqliteStore::in_memory().unwrap();
    for batch in 0..100 {
        let ops = (0..1000)
            .map(|i| put(&format!("vms/{:06}", batch * 1000 + i), &[7; 64]))
            .collect();
        store.txn(vec![], ops, vec![]).await.unwrap();
    }
    store.put("vmt", vec![]).await.unwrap();

    let start = Instant::now();
    let all = store.range("vms/").await.unwrap();
    let all_took = start.elapsed();
    assert_eq!(all.len(), 100_000);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));

    let start = Instant::now();
    let some = store.range("vms/04200").await.unwrap();
    let some_took = start.elapsed();
    assert_eq!(some.len(), 10);
    assert_eq!(some[0].key, "vms/042000");
    println!("range over 100k keys: all {all_took:?}, 10 of them {some_took:?}");
}
