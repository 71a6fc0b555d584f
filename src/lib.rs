//! mailbridge: a local proxy that lets password-only mail clients use
//! OAuth2-only mailboxes.
//!
//! A client logs in with a plain password over IMAP (later POP3 and SMTP);
//! mailbridge maps the login to an account with a sealed OAuth2 grant, gets
//! an access token, logs in upstream with XOAUTH2 or OAUTHBEARER and then
//! relays the session's bytes untouched.
#![forbid(unsafe_code)]

pub mod proto;
pub mod sandbox;
pub mod sasl;
