use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// kumod: the kumo controller.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Directory for the state database, the admin token and images.
    #[arg(long, env = "KUMOD_DATA_DIR", default_value = "/var/lib/kumod")]
    data_dir: PathBuf,
    /// Address to serve the API on.
    #[arg(long, env = "KUMOD_LISTEN", default_value = "127.0.0.1:7370")]
    listen: SocketAddr,
    /// Seconds without a heartbeat before a host is down.
    #[arg(long, default_value_t = 5.0)]
    down_after: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if !(args.down_after > 0.0 && args.down_after <= 3600.0) {
        anyhow::bail!(
            "--down-after: {} is out of range: use more than 0 and at most 3600 seconds",
            args.down_after
        );
    }
    let server = kumod::start(kumod::Config {
        data_dir: args.data_dir,
        listen: args.listen,
        down_after: Duration::from_secs_f64(args.down_after),
    })
    .await?;
    println!("kumod listening on {}", server.url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
