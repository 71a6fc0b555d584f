//! The device authorization grant (RFC 8628): `/device_authorization`,
//! the verification page, and polling at `/token`.

use super::*;

/// Where a device authorization stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum DeviceState {
    /// Waiting for the user.
    Pending,
    /// The user approved; the next poll gets the tokens.
    Approved(String),
    /// The user refused; polls get `access_denied`.
    Denied,
    /// Tokens were issued; the device code is spent.
    Redeemed,
}

/// A device code and its user code.
#[derive(Debug, Clone)]
pub(super) struct DeviceGrant {
    client_id: String,
    /// Eight characters of [`USER_CODE_ALPHABET`], without the dash.
    user_code: String,
    scope: String,
    expires: Instant,
    /// The current minimum time between polls; grows with each
    /// `slow_down`.
    interval: Duration,
    last_poll: Option<Instant>,
    state: DeviceState,
}

/// RFC 8628 section 6.1: consonants only, no vowels to spell words with
/// and no look-alike digits.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

fn new_user_code() -> String {
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    (0..8)
        .map(|_| char::from(USER_CODE_ALPHABET[rng.gen_range(0..USER_CODE_ALPHABET.len())]))
        .collect()
}

/// What the user typed, as stored: no dashes or spaces, upper case.
fn normalize_user_code(code: &str) -> String {
    code.chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// `BCDF-GHJK`, as shown to the user.
fn display_user_code(code: &str) -> String {
    let (a, b) = code.split_at(code.len() / 2);
    format!("{a}-{b}")
}

/// Whole seconds, rounded up, for `expires_in` and `interval`.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl TokenBook {
    /// A new pending device authorization: (device code, user code).
    fn new_device(
        &mut self,
        client_id: &str,
        scope: &str,
        expires: Instant,
        interval: Duration,
    ) -> (String, String) {
        let now = Instant::now();
        self.devices.retain(|_, d| d.expires + CODE_LIFETIME > now);
        let user_code = loop {
            let code = new_user_code();
            if !self.devices.values().any(|d| d.user_code == code) {
                break code;
            }
        };
        let device_code = random_token();
        self.devices.insert(
            device_code.clone(),
            DeviceGrant {
                client_id: client_id.to_string(),
                user_code: user_code.clone(),
                scope: scope.to_string(),
                expires,
                interval,
                last_poll: None,
                state: DeviceState::Pending,
            },
        );
        (device_code, display_user_code(&user_code))
    }

    /// Approves or denies the pending, unexpired authorization with
    /// `user_code`.
    pub(super) fn settle_device(&mut self, user_code: &str, state: DeviceState) -> bool {
        let wanted = normalize_user_code(user_code);
        let now = Instant::now();
        match self
            .devices
            .values_mut()
            .find(|d| d.user_code == wanted && d.state == DeviceState::Pending && d.expires > now)
        {
            Some(device) => {
                device.state = state;
                true
            }
            None => false,
        }
    }

    pub(super) fn pending_device_codes(&self, now: Instant) -> Vec<String> {
        self.devices
            .values()
            .filter(|d| d.state == DeviceState::Pending && d.expires > now)
            .map(|d| display_user_code(&d.user_code))
            .collect()
    }

    /// One poll (RFC 8628 section 3.5): the approved (user, scope), or the
    /// error to answer with. `base_interval` zero turns the rate limit off.
    pub(super) fn poll_device(
        &mut self,
        device_code: &str,
        client_id: &str,
        base_interval: Duration,
        now: Instant,
    ) -> Result<(String, String), OAuthError> {
        let Some(device) = self.devices.get_mut(device_code) else {
            return Err(OAuthError::new("invalid_grant", "device code is invalid"));
        };
        if device.client_id != client_id {
            return Err(OAuthError::new(
                "invalid_grant",
                "device code was issued to another client",
            ));
        }
        if device.state == DeviceState::Redeemed {
            return Err(OAuthError::new("invalid_grant", "device code already used"));
        }
        if device.expires <= now {
            return Err(OAuthError::new(
                "expired_token",
                "the device code has expired: start a new device authorization",
            ));
        }
        let too_fast = !base_interval.is_zero()
            && device
                .last_poll
                .is_some_and(|last| now.duration_since(last) < device.interval);
        device.last_poll = Some(now);
        let forced = self.forced_slow_downs > 0;
        if forced || too_fast {
            if forced {
                self.forced_slow_downs -= 1;
            }
            device.interval += Duration::from_secs(5);
            return Err(OAuthError::new(
                "slow_down",
                format!(
                    "polling too fast: wait {} seconds between polls",
                    ceil_secs(device.interval)
                ),
            ));
        }
        match &device.state {
            DeviceState::Pending => Err(OAuthError::new(
                "authorization_pending",
                "the user has not yet approved this device",
            )),
            DeviceState::Denied => Err(OAuthError::new(
                "access_denied",
                "the user denied the authorization request",
            )),
            DeviceState::Approved(user) => {
                let user = user.clone();
                device.state = DeviceState::Redeemed;
                Ok((user, device.scope.clone()))
            }
            DeviceState::Redeemed => {
                Err(OAuthError::new("invalid_grant", "device code already used"))
            }
        }
    }
}

pub(super) async fn device_authorization_endpoint(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Response {
    match device_authorization(&shared, &headers, form) {
        Ok(body) => (StatusCode::OK, no_store(), axum::Json(body)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// RFC 8628 section 3.1 and 3.2. Client authentication is that of
/// `/token`.
fn device_authorization(
    shared: &Shared,
    headers: &HeaderMap,
    form: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Result<serde_json::Value, OAuthError> {
    let params = form_params(form)?;
    let client = require_client(authenticate_client(shared, headers, &params)?)?;
    if !client.permits(DEVICE_CODE_GRANT) {
        return Err(unauthorized_client(DEVICE_CODE_GRANT));
    }
    let scope = params.get("scope").unwrap_or_default();
    if let Some(refused) = scope
        .split_ascii_whitespace()
        .find(|s| shared.refuse_device_scopes.iter().any(|r| r == s))
    {
        return Err(OAuthError::new(
            "invalid_scope",
            format!("scope {refused} is not allowed in the device flow"),
        ));
    }
    let lifetime = shared.device_code_lifetime;
    let (device_code, user_code) = shared.book().new_device(
        &client.id,
        scope,
        Instant::now() + lifetime,
        shared.device_interval,
    );
    let verification_uri = format!("{}/device", shared.base_url());
    Ok(json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": verification_uri,
        "verification_uri_complete": format!("{verification_uri}?user_code={user_code}"),
        "expires_in": ceil_secs(lifetime),
        "interval": ceil_secs(shared.device_interval),
    }))
}

/// The verification URI. Nobody types codes here: tests approve with
/// [`Provider::approve_device`].
pub(super) async fn verification_page() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Sandbox device verification: the test approves or denies the code.\n",
    )
        .into_response()
}
