//! OAuth2 on the login path: access tokens from stored grants.
//!
//! The token source owns the in-memory access-token cache and the refresh
//! logic: one refresh per account at a time (single flight), a rotated
//! refresh token sealed and flushed before the new access token is used,
//! and at least [`MIN_TOKEN_LIFETIME`] left on any cached token handed out.

mod token;

pub use token::{AccessToken, TokenError, TokenSource, one_line};

use std::time::Duration;

/// Microsoft's high-volume SMTP endpoint refuses tokens that expire within
/// minutes; a cached token with less than this left is refreshed first.
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(10 * 60);
