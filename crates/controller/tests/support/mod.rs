//! The previous release's state (`fixtures/state-v0.json`, described in
//! `previous_state.rs`), loaded into a fresh controller.

use kumo_store::{Op, SqliteStore, Store};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A controller over the fixture's state, set up as `tweak` says, in a
/// temporary data dir (removed when the returned guard drops).
pub async fn load_fixture(
    tweak: impl FnOnce(&mut kumod::Config),
) -> (tempfile::TempDir, Arc<kumod::app::App>) {
    let text = include_str!("../fixtures/state-v0.json");
    let records: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(text).expect("fixture is JSON");
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("controller");
    kumo_private_fs::create_dir(&data_dir).expect("data dir");
    {
        let store = SqliteStore::open(&data_dir.join("state.db")).expect("store");
        let ops = records
            .iter()
            .map(|(key, value)| Op::Put {
                key: key.clone(),
                value: serde_json::to_vec(value).expect("value"),
            })
            .collect();
        store.txn(Vec::new(), ops, Vec::new()).await.expect("txn");
    }
    let mut config = kumod::Config::new(data_dir, "127.0.0.1:0".parse().expect("addr"));
    tweak(&mut config);
    let app = kumod::app::App::open(&config)
        .await
        .expect("the old state loads");
    (dir, app)
}
