//! Committed transactions survive `kill -9` of the process (WAL with
//! `synchronous=NORMAL`: the commits are in the OS page cache).
//!
//! The test re-runs this test binary as a child that writes, reports its
//! last revision and waits to be killed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use kumo_store::{SqliteStore, Store, StoreExt};

const CHILD_ENV: &str = "KUMO_STORE_CRASH_CHILD_DB";
/// Enough single-key commits to pass at least one WAL checkpoint.
const PUTS: i64 = 1500;
const KEYS: i64 = 100;

/// The child's side; does nothing in a normal test run.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = SqliteStore::open(path.as_ref()).unwrap();
        let mut revision = 0;
        for i in 0..PUTS {
            revision = store
                .put(&format!("k/{:03}", i % KEYS), i.to_string().into_bytes())
                .await
                .unwrap();
        }
        println!("committed {revision}");
        // Still holding the store when killed; the parent kills us long before.
        std::thread::sleep(std::time::Duration::from_secs(60));
    });
}

#[tokio::test]
async fn commits_survive_kill_9() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kumo.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let committed = stdout
        .lines()
        .map_while(Result::ok)
        // libtest may print "test crash_child ... " on the same line first.
        .find_map(|line| line.split_once("committed ")?.1.trim().parse::<i64>().ok());
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert_eq!(committed, Some(PUTS), "the child did not finish writing");

    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.revision().await.unwrap(), PUTS);
    let kvs = store.range("k/").await.unwrap();
    assert_eq!(kvs.len() as i64, KEYS);
    for (k, kv) in (0..KEYS).zip(&kvs) {
        let last = PUTS - KEYS + k;
        assert_eq!(kv.key, format!("k/{k:03}"));
        assert_eq!(kv.value, last.to_string().into_bytes());
        assert_eq!(kv.mod_revision, last + 1);
        assert_eq!(kv.version, PUTS / KEYS);
    }
}
