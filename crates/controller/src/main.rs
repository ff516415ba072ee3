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
    /// Address to serve the API on; repeat it (or separate addresses with
    /// commas in KUMOD_LISTEN) to serve on several, e.g. a bridge address
    /// for the agents and 127.0.0.1 for people.
    #[arg(
        long,
        env = "KUMOD_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:7370"
    )]
    listen: Vec<SocketAddr>,
    /// Seconds without a heartbeat before a host is down.
    #[arg(long, default_value_t = 5.0)]
    down_after: f64,
    /// Turn automatic rebalancing off.
    #[arg(long)]
    no_rebalance: bool,
    /// Host CPU load (percent) above which rebalancing moves VMs away.
    #[arg(long, default_value_t = 85.0)]
    rebalance_threshold: f64,
    /// Seconds between rebalancing passes.
    #[arg(long, default_value_t = 30.0)]
    rebalance_period: f64,
    /// Seconds a host's load must stay above the threshold to count.
    #[arg(long, default_value_t = 60.0)]
    rebalance_sustain: f64,
    /// Migrations rebalancing starts per period, at most.
    #[arg(long, default_value_t = 1)]
    rebalance_max_moves: usize,
    /// Seconds between power-saving passes (for zones that turned it on).
    #[arg(long, default_value_t = 30.0)]
    power_period: f64,
}

/// Seconds from a flag, or a message naming it.
fn seconds(flag: &str, v: f64, min: f64, max: f64) -> anyhow::Result<Duration> {
    if !(v >= min && v <= max) {
        anyhow::bail!("--{flag}: {v} is out of range: use {min} to {max} seconds");
    }
    Ok(Duration::from_secs_f64(v))
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
    let rebalance = kumod::RebalanceSettings {
        enabled: !args.no_rebalance,
        threshold: args.rebalance_threshold,
        period: seconds("rebalance-period", args.rebalance_period, 0.1, 86_400.0)?,
        sustain: seconds("rebalance-sustain", args.rebalance_sustain, 0.0, 86_400.0)?,
        max_moves: args.rebalance_max_moves,
        ..Default::default()
    };
    if let Err(e) = rebalance.check() {
        anyhow::bail!("--rebalance-{}", e.replace('_', "-"));
    }
    let Some(&first) = args.listen.first() else {
        anyhow::bail!("--listen: give at least one address");
    };
    let server = kumod::start(kumod::Config {
        rebalance,
        power_period: seconds("power-period", args.power_period, 0.1, 86_400.0)?,
        down_after: Duration::from_secs_f64(args.down_after),
        listen: args.listen,
        ..kumod::Config::new(args.data_dir, first)
    })
    .await?;
    let urls: Vec<String> = server.addrs.iter().map(|a| format!("http://{a}")).collect();
    println!("kumod listening on {}", urls.join(", "));
    tokio::signal::ctrl_c().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_several_addresses() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(std::iter::once("kumod").chain(args.iter().copied()))
                .map(|a| a.listen)
        };
        let both: Vec<SocketAddr> = vec![
            "10.213.0.1:7370".parse().unwrap(),
            "127.0.0.1:7370".parse().unwrap(),
        ];
        let flags = ["--listen", "10.213.0.1:7370", "--listen", "127.0.0.1:7370"];
        assert_eq!(parse(&flags).unwrap(), both);
        assert_eq!(
            parse(&["--listen", "10.213.0.1:7370,127.0.0.1:7370"]).unwrap(),
            both
        );
        assert_eq!(parse(&[]).unwrap(), [both[1]]);
        assert!(parse(&["--listen", "localhost"]).is_err());
    }
}
