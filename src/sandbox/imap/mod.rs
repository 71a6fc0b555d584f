//! stub
#[derive(Clone)]
pub struct ImapServer;
pub struct ImapServerOptions;
