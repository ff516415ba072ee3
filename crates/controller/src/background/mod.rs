//! Background reconcilers: small named loops beside the API.

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
                tracing::warn!(error = %e, "host monitor");
            }
            if let Err(e) = monitor.migrations_check().await {
                tracing::warn!(error = %e, "migration monitor");
            }
            if let Err(e) = monitor.move_vms().await {
                tracing::warn!(error = %e, "mover");
            }
        }
    }));
}
