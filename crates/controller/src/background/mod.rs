//! Background reconcilers: small named loops beside the API: the host
//! monitor (liveness, migrations, the mover), the rebalancer
//! ([`crate::app::rebalance`]) and power saving ([`crate::app::power`]).

use crate::app::App;
use std::sync::Arc;
use std::time::Duration;

/// Start every reconciler; they stop with [`App::stop_background`].
pub fn spawn(app: &Arc<App>) {
    let monitor = app.clone();
    let period = (app.down_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    app.add_background(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if let Err(e) = monitor.host_check_liveness().await {
                tracing::warn!(error = %crate::error::Chain(&e), "host monitor");
            }
            if let Err(e) = monitor.migrations_check().await {
                tracing::warn!(error = %crate::error::Chain(&e), "migration monitor");
            }
            if let Err(e) = monitor.move_vms().await {
                tracing::warn!(error = %crate::error::Chain(&e), "mover");
            }
        }
    }));
    if app.rebalance.enabled {
        let rebalancer = app.clone();
        app.add_background(tokio::spawn(async move {
            let mut tick = tokio::time::interval(rebalancer.rebalance.period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is at once: let heartbeats arrive first.
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = rebalancer.rebalance_pass().await {
                    tracing::warn!(error = %crate::error::Chain(&e), "rebalancer");
                }
            }
        }));
    }
    let power = app.clone();
    app.add_background(tokio::spawn(async move {
        let mut tick = tokio::time::interval(power.power_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = power.power_pass().await {
                tracing::warn!(error = %crate::error::Chain(&e), "power saving");
            }
        }
    }));
}
