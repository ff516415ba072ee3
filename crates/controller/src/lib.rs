//! `kumod`, the kumo controller.
//!
//! Layers, outside in: [`http`] translates requests and calls into [`app`],
//! which owns the inventory (kept in memory, written through to the
//! [`kumo_store::Store`]); [`background`] holds the small reconcilers that run
//! beside it (host monitoring, the mover, rebalancing, power saving).

pub mod app;
pub mod background;
mod error;
pub mod http;

pub use app::passes::RebalanceSettings;
pub use error::Error;

use anyhow::Context;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How a controller is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds `state.db`, `admin-token` and the image files, owner-only.
    pub data_dir: PathBuf,
    /// Addresses to serve the API on, at least one: e.g. a bridge address
    /// for the agents and 127.0.0.1 for people, so the CLI keeps a
    /// loopback URL. [`Server::url`] names the first.
    pub listen: Vec<SocketAddr>,
    /// A host that sent no heartbeat for this long is `down`.
    pub down_after: Duration,
    /// Automatic rebalancing (on by default, conservative).
    pub rebalance: RebalanceSettings,
    /// How often power saving looks at the zones that opted in.
    pub power_period: Duration,
}

/// The default power-saving period.
pub const DEFAULT_POWER_PERIOD: Duration = Duration::from_secs(30);

impl Config {
    /// A controller serving on `listen` alone, with the default settings.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Config {
        Config {
            data_dir,
            listen: vec![listen],
            down_after: Duration::from_secs(5),
            rebalance: RebalanceSettings::default(),
            power_period: DEFAULT_POWER_PERIOD,
        }
    }
}

/// A running controller.
pub struct Server {
    /// The first address served on (with port 0 asked: the port given).
    pub addr: SocketAddr,
    /// Every address served on, in the order of [`Config::listen`].
    pub addrs: Vec<SocketAddr>,
    pub admin_token: String,
    pub app: Arc<app::App>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop serving (in-process tests).
    pub fn abort(&self) {
        self.task.abort();
        self.app.stop_background();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Open the state, start the background reconcilers and serve the API.
pub async fn start(config: Config) -> anyhow::Result<Server> {
    let app = app::App::open(&config).await?;
    background::spawn(&app);
    anyhow::ensure!(!config.listen.is_empty(), "no address to listen on");
    // Bind every address before serving any, so one that is taken fails
    // the start instead of leaving a controller half reachable.
    let mut listeners = Vec::new();
    for addr in &config.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        listeners.push(listener);
    }
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    let router = http::router(app.clone());
    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        servers.spawn(axum::serve(listener, router.clone()).into_future());
    }
    // Aborting this task drops the set, which aborts every server in it.
    let task = tokio::spawn(async move {
        while let Some(ended) = servers.join_next().await {
            if let Ok(Err(e)) = ended {
                tracing::error!(error = %crate::error::Chain(&e), "http server stopped");
            }
        }
    });
    tracing::info!(?addrs, data_dir = %config.data_dir.display(), "kumod serving");
    Ok(Server {
        addr: addrs[0],
        addrs,
        admin_token: app.admin_token().to_string(),
        app,
        task,
    })
}
