//! OAuth2: access tokens from stored grants on the login path, app-only
//! tokens ([`app`]), the checks a token must pass ([`checks`]), and the
//! flows that obtain grants in the first place ([`flows`]). Nothing here
//! depends on [`crate::authorize`], which runs these flows for a person.
//!
//! The token source owns the in-memory access-token cache and the refresh
//! logic: one refresh per account at a time (single flight), run in a task
//! that owns it so that no cancelled login can drop a rotated refresh
//! token; a rotated refresh token sealed and flushed before the new access
//! token is used (kept in memory and retried when the store cannot take
//! it); and on any cached token handed out at least the caller's floor
//! ([`MIN_TOKEN_LIFETIME`] for SMTP, `session_token_min_secs` for IMAP and
//! POP3) left, or half its life for tokens that live shorter
//! ([`fresh_enough`]).

pub mod app;
pub mod checks;
pub mod flows;
pub mod jwt;
mod token;

pub use token::{AccessToken, HttpClientError, TokenError, TokenSource, fresh_enough, one_line};

use std::time::Duration;

/// Microsoft's high-volume SMTP endpoint refuses tokens that expire within
/// minutes; a cached token with less than this left is refreshed first.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 60);
