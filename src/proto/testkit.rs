//! Test-only helpers shared by the protocol cores' unit tests: a scripted
//! view of an [`UpstreamLogin`]'s steps.

use super::{UpstreamLogin, UpstreamStep};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One upstream step, as the tests compare it.
#[derive(Debug, PartialEq, Eq)]
pub enum Up {
    Send(String),
    StartTls,
    NeedToken,
    Ok(Vec<String>, String),
    Rejected {
        status: Option<String>,
        text: String,
        retry: bool,
    },
    Err(String),
}

/// Collects steps until the session wants input (or fails).
pub fn up_pump(u: &mut dyn UpstreamLogin, evs: &mut Vec<Up>) {
    loop {
        let ev = match u.next_step() {
            Ok(UpstreamStep::NeedInput) => return,
            Ok(UpstreamStep::Send(b)) => Up::Send(text(&b)),
            Ok(UpstreamStep::StartTls) => Up::StartTls,
            Ok(UpstreamStep::NeedToken) => Up::NeedToken,
            Ok(UpstreamStep::Authenticated(ok)) => Up::Ok(ok.capabilities, text(&ok.leftover)),
            Ok(UpstreamStep::Rejected(r)) => Up::Rejected {
                status: r.challenge.and_then(|c| c.status),
                text: r.server_text,
                retry: r.retry_suggested,
            },
            Err(e) => {
                evs.push(Up::Err(e.to_string()));
                return;
            }
        };
        evs.push(ev);
    }
}

/// Feeds server bytes and collects the resulting steps.
pub fn up_feed(u: &mut dyn UpstreamLogin, input: &[u8]) -> Vec<Up> {
    let mut evs = Vec::new();
    u.feed(input);
    up_pump(u, &mut evs);
    evs
}
