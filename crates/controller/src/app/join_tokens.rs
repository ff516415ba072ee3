//! Join tokens: secrets that let a new host register itself.

use super::records::{join_token_key, TokenRecord};
use super::{now_ms, random_secret, sha256_hex, App, Batch};
use crate::error::Result;
use kumo_api::{CreateJoinToken, JoinToken, DEFAULT_PROJECT};
use uuid::Uuid;

const DEFAULT_TTL_SECONDS: u64 = 86_400;

impl App {
    pub async fn join_token_create(&self, req: CreateJoinToken) -> Result<JoinToken> {
        let ttl = req.ttl_seconds.unwrap_or(DEFAULT_TTL_SECONDS);
        let secret = random_secret();
        let now = now_ms();
        let token = JoinToken {
            id: Uuid::new_v4(),
            project: DEFAULT_PROJECT.to_string(),
            token: None,
            expires_at: now + ttl * 1000,
            created_at: now,
        };
        let rec = TokenRecord {
            token: token.clone(),
            sha256: sha256_hex(&secret),
        };
        let mut inv = self.inv.write().await;
        let mut batch = Batch::default();
        batch.put(join_token_key(token.id), &rec);
        batch.event(
            "join_token.created",
            format!("join-token/{}", token.id),
            &token.project,
            format!("join token created, valid for {ttl} s"),
        );
        self.commit(&mut inv, batch).await?;
        inv.join_tokens.insert(token.id, rec);
        Ok(JoinToken {
            token: Some(secret),
            ..token
        })
    }

    pub async fn join_token_list(&self) -> Vec<JoinToken> {
        let inv = self.inv.read().await;
        inv.join_tokens.values().map(|t| t.token.clone()).collect()
    }

    /// Whether `secret` is a join token that has not expired.
    pub(crate) fn join_token_valid(inv: &super::Inventory, secret: &str) -> bool {
        let hash = sha256_hex(secret);
        let now = now_ms();
        inv.join_tokens
            .values()
            .any(|t| t.sha256 == hash && t.token.expires_at > now)
    }
}
