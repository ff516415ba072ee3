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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How a controller is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds `state.db`, `admin-token` and the image files, owner-only.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
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
    /// A controller with the default settings.
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Config {
        Config {
            data_dir,
            listen,
            down_after: Duration::from_secs(5),
            rebalance: RebalanceSettings::default(),
            power_period: DEFAULT_POWER_PERIOD,
        }
    }
}

/// A running controller.
pub struct Server {
    pub addr: SocketAddr,
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
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let router = http::router(app.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %crate::error::Chain(&e), "http server stopped");
        }
    });
    tracing::info!(%addr, data_dir = %config.data_dir.display(), "kumod serving");
    Ok(Server {
        addr,
        admin_token: app.admin_token().to_string(),
        app,
        task,
    })
}
