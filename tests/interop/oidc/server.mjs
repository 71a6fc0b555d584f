// A real OAuth2/OIDC server for mailbridge's interop suite: the
// `oidc-provider` package from the npm registry (pinned in package.json),
// configured here. Dovecot validates the access tokens it issues by RFC 7662
// introspection; mailbridge refreshes them; the suite drives its login and
// consent pages.
//
// Usage: node server.mjs   with OIDC_PORT set (127.0.0.1 only).
//
// Configuration in this file:
//   - authorization code + PKCE (S256 required for every client),
//   - refresh tokens that rotate on every use (reuse of a spent one revokes
//     the whole grant, the library's behaviour),
//   - client credentials, introspection, revocation,
//   - short access-token lifetimes (per client, below),
//   - a login page checking the passwords below and a consent page.
// Test-only observation: GET /_interop/events lists what happened (grant
// types, token issues and consumptions; no token values). POST
// /_interop/revoke?account=NAME ends every grant of a user, like a user
// removing an app's access in their account settings. POST
// /_interop/token-delay?ms=N holds every token endpoint answer N ms after
// the server has done the work (a refresh has rotated the grant by then),
// like a provider whose answers are slow to come back.

import http from 'node:http';
import { URL } from 'node:url';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.env.OIDC_PORT || 0);
if (!port) {
  console.error('OIDC_PORT is not set');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;

// The audience of mail access tokens (one resource server: the mail store).
const MAIL_RESOURCE = 'https://mail.example.test/';

// Users: the mailbox address is the subject. Passwords are for the login
// page of this server only (the OAuth2 user's password, never mailbridge's).
const USERS = new Map(Object.entries({
  'alice@example.test': 'alice-idp-password',
  'bob@example.test': 'bob-idp-password',
  'carol@example.test': 'carol-idp-password',
  'dave@example.test': 'dave-idp-password',
  'erin@example.test': 'erin-idp-password',
  'frank@example.test': 'frank-idp-password',
  'grace@example.test': 'grace-idp-password',
  'heidi@example.test': 'heidi-idp-password',
  'ivan@example.test': 'ivan-idp-password',
  'judy@example.test': 'judy-idp-password',
}));

// Access-token lifetimes in seconds, by client. Both are far shorter than
// mailbridge's floors (10 minutes for SMTP, 30 for IMAP and POP3), so
// mailbridge reuses each token for the first half of its life and then
// refreshes: `mailbridge` gets 20-second tokens (reused for 10 s),
// `mailbridge-public` one minute (reused for 30 s, long enough for the
// cache cases to run while it is fresh).
const ACCESS_TTL = {
  mailbridge: 20,
  'mailbridge-public': 60,
  'mailbridge-big': 20,
  reporter: 20,
};

// `mailbridge-big` gets access tokens of Microsoft's size (about 2 KB;
// Entra ID tokens are 1.5 to 3 KB) instead of 43 characters.
const BIG_TOKEN_BITS = 12000;

// Loopback redirects (RFC 8252): for native clients oidc-provider ignores
// the port. `/callback` is the suite's own; `/` is where `mailbridge account
// add` listens.
const REDIRECT = 'http://127.0.0.1/callback';
const LOOPBACK = 'http://127.0.0.1/';

const events = [];
function record(name, fields = {}) {
  events.push({ at: Date.now() / 1000, event: name, ...fields });
}

const configuration = {
  clients: [
    {
      // A confidential client (secret in the form body, as mailbridge sends it).
      client_id: 'mailbridge',
      client_secret: 'mailbridge-client-secret',
      token_endpoint_auth_method: 'client_secret_post',
      application_type: 'native',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: [REDIRECT, LOOPBACK],
    },
    {
      // A public client (no secret), as desktop apps are registered.
      client_id: 'mailbridge-public',
      token_endpoint_auth_method: 'none',
      application_type: 'native',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: [REDIRECT, LOOPBACK],
    },
    {
      // Like `mailbridge`, with big access tokens.
      client_id: 'mailbridge-big',
      client_secret: 'mailbridge-big-client-secret',
      token_endpoint_auth_method: 'client_secret_post',
      application_type: 'native',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: [REDIRECT, LOOPBACK],
    },
    {
      // Dovecot: a resource server that only introspects.
      client_id: 'dovecot',
      client_secret: 'dovecot-introspection-secret',
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: [],
      response_types: [],
      redirect_uris: [],
    },
    {
      // An app acting as itself (client credentials).
      client_id: 'reporter',
      client_secret: 'reporter-client-secret',
      token_endpoint_auth_method: 'client_secret_post',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
    },
  ],
  scopes: ['openid', 'offline_access', 'mail'],
  claims: { openid: ['sub'], email: ['email'] },
  pkce: { required: () => true },
  rotateRefreshToken: true,
  features: {
    devInteractions: { enabled: false },
    introspection: {
      enabled: true,
      // Only the mail server may introspect, and only access tokens: a
      // refresh token presented as a bearer token must not log anyone in.
      allowedPolicy: async (ctx, client, token) => client.clientId === 'dovecot'
        && token.kind !== 'RefreshToken',
    },
    revocation: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => MAIL_RESOURCE,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, resource, client) => {
        if (resource !== MAIL_RESOURCE) throw new errors.InvalidTarget();
        return {
          scope: 'mail',
          audience: MAIL_RESOURCE,
          accessTokenFormat: 'opaque',
          accessTokenTTL: ACCESS_TTL[client.clientId] || 20,
        };
      },
    },
  },
  ttl: {
    AccessToken: (ctx, token, client) => ACCESS_TTL[client.clientId] || 20,
    ClientCredentials: (ctx, token, client) => ACCESS_TTL[client.clientId] || 20,
    AuthorizationCode: 60,
    RefreshToken: 24 * 3600,
    Grant: 24 * 3600,
    Session: 3600,
    Interaction: 600,
    IdToken: 600,
  },
  formats: {
    bitsOfOpaqueRandomness: (ctx, token) => (
      token.kind === 'AccessToken' && token.clientId === 'mailbridge-big' ? BIG_TOKEN_BITS : 256),
  },
  cookies: { keys: ['mailbridge-interop-cookie-key'] },
  findAccount: async (ctx, sub) => {
    if (!USERS.has(sub)) return undefined;
    return { accountId: sub, claims: async () => ({ sub, email: sub }) };
  },
  interactions: { url: async (ctx, interaction) => `/interaction/${interaction.uid}` },
};

const provider = new Provider(issuer, configuration);

// The token endpoint's answer is held after the grant was processed (and a
// refresh token rotated): what a client that gives up early has to survive.
let tokenDelayMs = 0;
provider.use(async (ctx, next) => {
  await next();
  if (tokenDelayMs > 0 && ctx.method === 'POST' && ctx.path === '/token') {
    record('token.delayed', { ms: tokenDelayMs });
    await new Promise((resolve) => { setTimeout(resolve, tokenDelayMs); });
  }
});

provider.on('grant.success', (ctx) => {
  const at = ctx.oidc.entities.AccessToken || ctx.oidc.entities.ClientCredentials;
  record('grant.success', {
    grant_type: ctx.oidc.params.grant_type,
    client_id: ctx.oidc.client?.clientId,
    account: ctx.oidc.entities.Account?.accountId,
    expires_in: at?.expiration,
    rotated: Boolean(ctx.oidc.entities.RotatedRefreshToken),
  });
});
provider.on('grant.error', (ctx, err) => {
  record('grant.error', {
    grant_type: ctx.oidc.params?.grant_type,
    client_id: ctx.oidc.client?.clientId,
    error: err.error,
    description: err.error_description,
  });
});
provider.on('grant.revoked', (ctx, grantId) => record('grant.revoked', { grant_id: grantId }));
provider.on('refresh_token.consumed', (token) => {
  record('refresh_token.consumed', { account: token.accountId, jti: token.jti.slice(0, 8) });
});
provider.on('refresh_token.saved', (token) => {
  record('refresh_token.saved', { account: token.accountId, jti: token.jti.slice(0, 8) });
});
provider.on('introspection.error', (ctx, err) => record('introspection.error', { error: err.message }));
provider.on('server_error', (ctx, err) => {
  record('server_error', { error: String(err) });
  console.error('server_error', err);
});

// Introspection results, as Dovecot sees them (no token values).
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/token/introspection' && ctx.method === 'POST') {
    const body = ctx.body || {};
    record('introspection', {
      client_id: ctx.oidc?.client?.clientId,
      active: Boolean(body.active),
      account: body.sub,
      status: ctx.status,
    });
  }
});

// Grants by account, for /_interop/revoke.
const grantsByAccount = new Map();
provider.on('grant.saved', (grant) => {
  if (!grant.accountId) return;
  if (!grantsByAccount.has(grant.accountId)) grantsByAccount.set(grant.accountId, new Set());
  grantsByAccount.get(grant.accountId).add(grant.jti);
});

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(res, status, title, body) {
  const html = `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${esc(title)}</title></head>`
    + `<body><h1>${esc(title)}</h1>${body}</body></html>`;
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'cache-control': 'no-store',
  });
  res.end(html);
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const c of req) {
    size += c.length;
    if (size > 64 * 1024) throw new Error('form too large');
    chunks.push(c);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function loginForm(uid, details, error) {
  const hint = details.params.login_hint || '';
  return `${error ? `<p class="error">${esc(error)}</p>` : ''}`
    + `<p>Sign in to continue to ${esc(details.params.client_id)}.</p>`
    + `<form method="post" action="/interaction/${esc(uid)}/login">`
    + `<label>Email <input name="login" value="${esc(hint)}"></label>`
    + '<label>Password <input type="password" name="password"></label>'
    + '<button type="submit">Sign in</button></form>';
}

function consentForm(uid, details) {
  const scopes = [...new Set([
    ...(details.prompt.details.missingOIDCScope || []),
    ...Object.values(details.prompt.details.missingResourceScopes || {}).flat(),
  ])];
  return `<p>${esc(details.params.client_id)} asks for: `
    + `<span id="scopes">${esc(scopes.join(' '))}</span></p>`
    + `<form method="post" action="/interaction/${esc(uid)}/confirm">`
    + '<button type="submit" name="decision" value="allow">Allow</button>'
    + '<button type="submit" name="decision" value="deny">Deny</button></form>';
}

async function interaction(req, res, url) {
  const parts = url.pathname.split('/').filter(Boolean); // interaction, uid, [action]
  const [, uid, action] = parts;
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    page(res, 400, 'Wrong interaction', '');
    return;
  }
  const { prompt } = details;
  if (req.method === 'GET' && !action) {
    if (prompt.name === 'login') page(res, 200, 'Sign in', loginForm(uid, details));
    else page(res, 200, 'Authorize', consentForm(uid, details));
    return;
  }
  if (req.method === 'POST' && action === 'login' && prompt.name === 'login') {
    const form = await readForm(req);
    const login = (form.get('login') || '').trim().toLowerCase();
    const password = form.get('password') || '';
    if (!USERS.has(login) || USERS.get(login) !== password) {
      record('login.failed', { account: login });
      page(res, 200, 'Sign in', loginForm(uid, details, 'Wrong email or password.'));
      return;
    }
    record('login.success', { account: login });
    await provider.interactionFinished(req, res, { login: { accountId: login } }, {
      mergeWithLastSubmission: false,
    });
    return;
  }
  if (req.method === 'POST' && action === 'confirm' && prompt.name === 'consent') {
    const form = await readForm(req);
    if (form.get('decision') !== 'allow') {
      await provider.interactionFinished(req, res, {
        error: 'access_denied',
        error_description: 'the user denied the request',
      }, { mergeWithLastSubmission: false });
      return;
    }
    const { accountId } = details.session;
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId, clientId: details.params.client_id });
    const d = prompt.details;
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    for (const [resource, scopes] of Object.entries(d.missingResourceScopes || {})) {
      grant.addResourceScope(resource, scopes.join(' '));
    }
    const grantId = await grant.save();
    record('consent', { account: accountId, client_id: details.params.client_id });
    await provider.interactionFinished(req, res, { consent: { grantId } }, {
      mergeWithLastSubmission: true,
    });
    return;
  }
  page(res, 400, 'Unexpected step', `<p>${esc(req.method)} ${esc(action || '')} during ${esc(prompt.name)}</p>`);
}

async function revokeAccount(account) {
  let n = 0;
  for (const grantId of grantsByAccount.get(account) || []) {
    const grant = await provider.Grant.find(grantId);
    if (grant) {
      await grant.destroy();
      n += 1;
    }
  }
  // The grant's tokens stop working with it: introspection and the
  // refresh_token grant both look the grant up.
  grantsByAccount.delete(account);
  record('admin.revoke', { account, grants: n });
  return n;
}

const handler = provider.callback();
const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, issuer);
  try {
    if (url.pathname.startsWith('/interaction/')) {
      await interaction(req, res, url);
    } else if (url.pathname === '/_interop/events' && req.method === 'GET') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(events));
    } else if (url.pathname === '/_interop/token-delay' && req.method === 'POST') {
      tokenDelayMs = Math.max(0, Number(url.searchParams.get('ms') || 0));
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ ms: tokenDelayMs }));
    } else if (url.pathname === '/_interop/revoke' && req.method === 'POST') {
      const n = await revokeAccount(url.searchParams.get('account') || '');
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ revoked: n }));
    } else {
      handler(req, res);
    }
  } catch (err) {
    console.error('interaction error:', err);
    if (!res.headersSent) page(res, 500, 'Error', `<p>${esc(err.message)}</p>`);
    else res.end();
  }
});

server.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider ${issuer} ready`);
});

for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close();
    process.exit(0);
  });
}
