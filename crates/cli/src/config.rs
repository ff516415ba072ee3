//! Where the CLI finds the controller: `KUMO_URL` / `KUMO_TOKEN`, else the
//! credentials file `kumo login` wrote in the user's config directory.

use anyhow::{Context, Result};
use kumo_client::Client;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Serialize, Deserialize)]
struct Credentials {
    url: String,
    token: String,
}

fn path() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".config"),
    };
    Ok(base.join("kumo").join("credentials.json"))
}

pub fn save(url: &str, token: &str) -> Result<PathBuf> {
    let path = path()?;
    kumo_private_fs::create_dir(path.parent().expect("has a parent"))?;
    let bytes = serde_json::to_vec_pretty(&Credentials {
        url: url.to_string(),
        token: token.to_string(),
    })?;
    kumo_private_fs::write_file(&path, &bytes)?;
    Ok(path)
}

pub fn client() -> Result<Client> {
    let saved: Option<Credentials> = match std::fs::read(path()?) {
        Ok(b) => Some(serde_json::from_slice(&b).context("reading the credentials file")?),
        Err(_) => None,
    };
    let url = std::env::var("KUMO_URL")
        .ok()
        .or_else(|| saved.as_ref().map(|c| c.url.clone()));
    let token = std::env::var("KUMO_TOKEN")
        .ok()
        .or_else(|| saved.as_ref().map(|c| c.token.clone()));
    match (url, token) {
        (Some(url), Some(token)) => Ok(Client::new(&url, &token)),
        _ => anyhow::bail!(
            "no controller configured: run `kumo login URL --token-file FILE` (the quickstart does), \
             or set KUMO_URL and KUMO_TOKEN"
        ),
    }
}
