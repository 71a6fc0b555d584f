//! SMTP: client-facing pre-auth session and upstream login dialogue.
