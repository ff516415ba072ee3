//! Simulated guests: state in memory, no processes.

use uuid::Uuid;

#[derive(Default)]
pub struct Sim;

impl Sim {
    pub fn guest(&self, _id: Uuid) -> SimGuest {
        SimGuest { running: false }
    }
}

pub struct SimGuest {
    running: bool,
}

impl SimGuest {
    pub fn is_running(&self) -> bool {
        self.running
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        self.running = true;
        Ok(())
    }

    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.running = false;
        Ok(())
    }
}
