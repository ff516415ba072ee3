//! The interactive serial console: the terminal in raw mode, bytes both ways,
//! Ctrl-] to leave.

use anyhow::Result;
use kumo_client::Client;
use nix::sys::termios::{self, SetArg, Termios};
use std::io::IsTerminal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ESCAPE: u8 = 0x1d; // Ctrl-]

/// Puts the terminal back as it was when dropped.
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(RawMode(None));
        }
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(RawMode(Some(saved)))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, t);
        }
    }
}

pub async fn attach(client: &Client, name: &str) -> Result<()> {
    let stream = client.console(name).await?;
    eprintln!("connected to the serial console of {name}; leave with Ctrl-]\r");
    let _raw = RawMode::enter()?;
    let (mut from_vm, mut to_vm) = tokio::io::split(stream);
    let output = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_vm.read(&mut buf).await {
            if n == 0 || stdout.write_all(&buf[..n]).await.is_err() {
                break;
            }
            let _ = stdout.flush().await;
        }
    });
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)), if output.is_finished() => break,
            read = stdin.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    // Input ended (not a terminal): let the reply arrive, then leave.
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    break;
                }
                if let Some(i) = buf[..n].iter().position(|b| *b == ESCAPE) {
                    to_vm.write_all(&buf[..i]).await?;
                    break;
                }
                to_vm.write_all(&buf[..n]).await?;
            }
        }
    }
    output.abort();
    eprintln!("\r\ndisconnected from {name}\r");
    Ok(())
}
