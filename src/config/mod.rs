//! The configuration: the file's schema ([`schema`]: serde structs and
//! defaults, depending on nothing else in the crate) and the validated
//! [`Settings`] ([`settings`]: presets applied through
//! [`crate::provider`], errors with line numbers, account lookup).
//!
//! Dependencies run one way: `schema` <- `provider` <- `settings`.

pub mod schema;
pub mod settings;

pub use schema::{
    AccountConfig, AlertsConfig, Config, GrantKind, KeyMode, ListenerConfig, ListenerTls, Protocol,
    ProviderConfig, ServerConfig, ServerEndpointConfig, UpstreamTls,
};
pub use settings::{Account, ConfigError, Listener, Settings};
