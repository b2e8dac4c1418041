//! [`Purger`]: for every bumped token, the purge its proxy understands.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use icache::ICache;

use crate::key::surrogate_key;

/// Bytes of keys in one Varnish `xkey-purge` header (Varnish takes 8 KB of
/// request headers by default, `http_req_hdr_len`).
const VARNISH_HEADER_BYTES: usize = 4000;
/// Keys in one Fastly purge request (the API's limit).
const FASTLY_KEYS: usize = 256;
/// Tags in one Cloudflare purge request (the API's limit on most plans).
const CLOUDFLARE_TAGS: usize = 30;
/// Tries per purge request, with a doubling pause from 50 ms.
const ATTEMPTS: u32 = 3;
/// How long the relay's hook ([`Purger::relay_hook`]) keeps a batch's rows
/// while the proxy refuses: a blip is retried from the outbox itself;
/// beyond it the purges wait in the purger and the relay's bumps go on.
pub const RELAY_HOLD: Duration = Duration::from_secs(10);
/// The background retry of pending purges: from this pause, doubling, up
/// to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// Fastly's API.
pub const FASTLY_API: &str = "https://api.fastly.com";
/// Cloudflare's API.
pub const CLOUDFLARE_API: &str = "https://api.cloudflare.com/client/v4";

#[derive(Clone)]
enum Target {
    /// `PURGE /` with `xkey-purge: k1 k2 …` (the repo's VCL, vmod xkey).
    Varnish { url: String },
    /// `POST {api}/service/{service}/purge` with `Surrogate-Key: k1 k2 …`.
    Fastly {
        api: String,
        service: String,
        token: String,
    },
    /// `POST {api}/zones/{zone}/purge_cache` with `{"tags": [...]}`.
    Cloudflare {
        api: String,
        zone: String,
        token: String,
    },
}

impl fmt::Debug for Target {
    // Never the tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Varnish { url } => write!(f, "Varnish at {url}"),
            Target::Fastly { api, service, .. } => write!(f, "Fastly service {service} at {api}"),
            Target::Cloudflare { api, zone, .. } => write!(f, "Cloudflare zone {zone} at {api}"),
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PurgeErrorKind {
    /// The purge configuration (a URL) is malformed.
    Config,
    /// The bump itself failed ([`Purger::incr_and_purge`]): nothing was
    /// purged (icache remembers the bump and replays it).
    Bump,
    /// The proxy or its API refused or did not answer, after retries: pages
    /// of these tokens may still be served by it until purged.
    Purge,
}

/// A purge (or its configuration, or the bump before it) that failed; the
/// message names the proxy and what it answered.
#[derive(Debug, Clone)]
pub struct PurgeError {
    kind: PurgeErrorKind,
    message: String,
}

impl PurgeError {
    fn new(kind: PurgeErrorKind, message: impl Into<String>) -> PurgeError {
        PurgeError {
            kind,
            message: message.into(),
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> PurgeErrorKind {
        self.kind
    }
}

impl fmt::Display for PurgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PurgeError {}

/// Counters since the purger was built (also `icache_http_purges_total` by
/// `result`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PurgeStats {
    /// Purge requests the proxy accepted.
    pub ok: u64,
    /// Purge requests that failed after their retries.
    pub failed: u64,
}

struct Inner {
    target: Target,
    agent: ureq::Agent,
    ok: AtomicU64,
    failed: AtomicU64,
    /// Tokens whose purge failed: sent again with the next purge, and by
    /// the retry thread meanwhile.
    pending: Mutex<Vec<String>>,
    /// Since when every purge failed (`None`: the last one went through).
    failing_since: Mutex<Option<Instant>>,
    /// The retry thread runs (one per purger and its clones).
    retrying: AtomicBool,
    /// [`Purger::relay_hold`].
    hold: Duration,
    /// Purges of bumps that failed, each waiting until its handle has
    /// replayed them ([`Purger::defer`]).
    deferred: Mutex<Vec<(ICache, Vec<String>)>>,
}

/// Most tokens remembered for a later purge (beyond it the oldest are
/// dropped, with a warning: those pages stay at the proxy until purged).
const MAX_PENDING: usize = 100_000;

/// Sends, for every bumped token, the purge of its
/// [`surrogate_key`](crate::surrogate_key) to the proxy in front of the
/// site: Varnish (`PURGE` with `xkey-purge`, the repo's VCL), Fastly
/// (surrogate-key purge) or Cloudflare (purge by cache tags).
///
/// Two places to call it from:
///
/// * the outbox relay's `after_bump` hook: [`purge`](Self::purge) returns a
///   `Result`, so a failed purge makes the relay retry its rows (purges at
///   least once);
/// * right after a bump, without a relay:
///   [`incr_and_purge`](Self::incr_and_purge).
///
/// Each request is tried 3 times (50 ms, then 100 ms apart), with a 2 s
/// time-out; keys are sent in batches the APIs take. Clones share their
/// connections and counters.
///
/// # Example
///
/// ```no_run
/// let cache = icache::ICache::memory();
/// let purger = icache_http::Purger::from_url("http://127.0.0.1:6081")?;
/// // After the commit: bump, then purge the pages that read the tokens.
/// purger.incr_and_purge(&cache, &["movies", "42"])?;
/// # Ok::<(), icache_http::PurgeError>(())
/// ```
#[derive(Clone)]
pub struct Purger {
    inner: Arc<Inner>,
}

impl fmt::Debug for Purger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Purger")
            .field("target", &self.inner.target)
            .field("stats", &self.stats())
            .finish()
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        // Varnish's PURGE.
        .allow_non_standard_methods(true)
        .build()
        .into()
}

fn check_http_url(url: &str) -> Result<String, PurgeError> {
    let bad = |why: &str| {
        PurgeError::new(
            PurgeErrorKind::Config,
            format!("purge URL {url:?}: {why} (expected http://HOST:PORT)"),
        )
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| bad("the scheme must be http or https"))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if let Some((_, port)) = host.rsplit_once(':')
        && !host.ends_with(']')
        && port.parse::<u16>().is_err()
    {
        return Err(bad(&format!(
            "port {port:?} is not a number from 0 to 65535"
        )));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

impl Purger {
    fn with(target: Target) -> Purger {
        // On /metrics from the start, not from the first purge.
        for result in ["ok", "error"] {
            metrics::counter!("icache_http_purges_total", "result" => result).increment(0);
        }
        Purger {
            inner: Arc::new(Inner {
                target,
                agent: agent(Duration::from_secs(2)),
                ok: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                pending: Mutex::new(Vec::new()),
                failing_since: Mutex::new(None),
                retrying: AtomicBool::new(false),
                hold: RELAY_HOLD,
                deferred: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Purges a Varnish at `url` (`http://127.0.0.1:6081`) running the
    /// repo's VCL (vmod xkey).
    ///
    /// # Errors
    ///
    /// [`PurgeErrorKind::Config`] for a URL that is not `http(s)://HOST[:PORT]`.
    pub fn varnish(url: &str) -> Result<Purger, PurgeError> {
        Ok(Purger::with(Target::Varnish {
            url: check_http_url(url)?,
        }))
    }

    /// Purges a Fastly service by surrogate key, with an API token allowed
    /// to purge it.
    pub fn fastly(service_id: &str, api_token: &str) -> Purger {
        Purger::with(Target::Fastly {
            api: FASTLY_API.to_owned(),
            service: service_id.to_owned(),
            token: api_token.to_owned(),
        })
    }

    /// Purges a Cloudflare zone by cache tag (pages tagged with
    /// [`SurrogateHeader::CacheTag`](crate::SurrogateHeader::CacheTag)).
    pub fn cloudflare(zone_id: &str, api_token: &str) -> Purger {
        Purger::with(Target::Cloudflare {
            api: CLOUDFLARE_API.to_owned(),
            zone: zone_id.to_owned(),
            token: api_token.to_owned(),
        })
    }

    /// A purger from one URL (what `ICACHE_PURGE_URL` holds):
    /// `http(s)://HOST:PORT` for Varnish, `fastly://SERVICE_ID?token=…`,
    /// `cloudflare://ZONE_ID?token=…` (each may add `&api=URL`).
    ///
    /// # Errors
    ///
    /// [`PurgeErrorKind::Config`], naming the bad part.
    ///
    /// # Example
    ///
    /// ```
    /// use icache_http::Purger;
    /// assert!(Purger::from_url("http://127.0.0.1:6081").is_ok());
    /// assert!(Purger::from_url("fastly://SU1Z0isxPaozGVKXdv0eY?token=abc").is_ok());
    /// let err = Purger::from_url("cloudflare://zone").unwrap_err();
    /// assert!(err.to_string().contains("token"), "{err}");
    /// ```
    pub fn from_url(url: &str) -> Result<Purger, PurgeError> {
        let bad =
            |why: String| PurgeError::new(PurgeErrorKind::Config, format!("purge URL: {why}"));
        let cdn = |rest: &str,
                   scheme: &str|
         -> Result<(String, String, Option<String>), PurgeError> {
            let (id, query) = rest.split_once('?').unwrap_or((rest, ""));
            let id = id.trim_end_matches('/');
            if id.is_empty() {
                return Err(bad(format!("{scheme}:// needs an id after the scheme")));
            }
            let (mut token, mut api) = (None, None);
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("token", v)) if !v.is_empty() => token = Some(v.to_owned()),
                    Some(("api", v)) => api = Some(check_http_url(v)?),
                    _ => {
                        let name = pair.split('=').next().unwrap_or(pair);
                        return Err(bad(format!(
                            "unknown option {name:?} in {scheme}:// (known: token, api)"
                        )));
                    }
                }
            }
            let token = token.ok_or_else(|| bad(format!("{scheme}:// needs ?token=API_TOKEN")))?;
            Ok((id.to_owned(), token, api))
        };
        if let Some(rest) = url.strip_prefix("fastly://") {
            let (service, token, api) = cdn(rest, "fastly")?;
            let p = Purger::fastly(&service, &token);
            return Ok(match api {
                Some(api) => p.api_base(&api),
                None => p,
            });
        }
        if let Some(rest) = url.strip_prefix("cloudflare://") {
            let (zone, token, api) = cdn(rest, "cloudflare")?;
            let p = Purger::cloudflare(&zone, &token);
            return Ok(match api {
                Some(api) => p.api_base(&api),
                None => p,
            });
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return Purger::varnish(url);
        }
        Err(bad(format!(
            "{url:?}: the scheme must be http(s):// (Varnish), fastly:// or cloudflare://"
        )))
    }

    /// Where the Fastly or Cloudflare API is (a local recording server in
    /// tests); no effect on a Varnish purger.
    pub fn api_base(self, url: &str) -> Purger {
        let url = url.trim_end_matches('/').to_owned();
        let target = match self.inner.target.clone() {
            Target::Fastly { service, token, .. } => Target::Fastly {
                api: url,
                service,
                token,
            },
            Target::Cloudflare { zone, token, .. } => Target::Cloudflare {
                api: url,
                zone,
                token,
            },
            varnish => varnish,
        };
        let mut p = Purger::with(target);
        if let Some(inner) = Arc::get_mut(&mut p.inner) {
            inner.agent = self.inner.agent.clone();
            inner.hold = self.inner.hold;
        }
        p
    }

    /// The time-out of each purge request (default 2 s).
    pub fn timeout(self, timeout: Duration) -> Purger {
        self.rebuilt(agent(timeout), self.inner.hold)
    }

    /// How long the relay hook keeps a batch's rows while the proxy
    /// refuses (default [`RELAY_HOLD`]); see [`relay_hook`](Self::relay_hook).
    pub fn relay_hold(self, hold: Duration) -> Purger {
        self.rebuilt(self.inner.agent.clone(), hold)
    }

    /// A purger of its own (builder methods: counters and pending purges
    /// start afresh) with this target, agent and hold.
    fn rebuilt(&self, agent: ureq::Agent, hold: Duration) -> Purger {
        let mut p = Purger::with(self.inner.target.clone());
        if let Some(inner) = Arc::get_mut(&mut p.inner) {
            inner.agent = agent;
            inner.hold = hold;
        }
        p
    }

    /// The counters since the purger was built.
    pub fn stats(&self) -> PurgeStats {
        PurgeStats {
            ok: self.inner.ok.load(Ordering::Relaxed),
            failed: self.inner.failed.load(Ordering::Relaxed),
        }
    }

    /// Tokens whose purge failed and that the next [`purge`](Self::purge)
    /// sends again.
    pub fn pending(&self) -> usize {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Purges every page that read one of `tokens`, and the tokens of
    /// earlier purges that failed. Blocking (call it from the relay's
    /// thread, a blocking task, or after `incr`).
    ///
    /// # Errors
    ///
    /// [`PurgeErrorKind::Purge`] when a request still failed after its
    /// retries; the message names the proxy and its answer. The tokens are
    /// then remembered and sent again with the next purge (purging twice is
    /// harmless).
    pub fn purge<S: AsRef<str>>(&self, tokens: &[S]) -> Result<(), PurgeError> {
        let tokens: Vec<String> = tokens.iter().map(|t| t.as_ref().to_owned()).collect();
        if self.inner.down_past_hold() {
            // Refused for longer than the hold: queued for the retry thread
            // (which probes the proxy) instead of one more round of
            // time-outs in the caller's request.
            self.inner.remember(tokens, true);
            return Err(PurgeError::new(
                PurgeErrorKind::Purge,
                format!(
                    "purge at {:?}: the proxy has refused purges for over {:?}; queued, sent when \
                     it answers",
                    self.inner.target, self.inner.hold
                ),
            ));
        }
        self.inner.purge(tokens)
    }

    /// The purge of a bump of `tokens` that failed on `cache`: `cache`
    /// replays the bump before its next read or bump, and until then
    /// another process may still render these pages at the old generations
    /// and the proxy keep them. So the purge is sent once `cache` has no
    /// bump waiting any more ([`ICache::has_pending_bumps`]), checked in
    /// the background (from 0.5 s, doubling to 10 s). Purge now as well to
    /// drop what the proxy holds already.
    pub fn defer<S: AsRef<str>>(&self, cache: &ICache, tokens: &[S]) {
        let tokens: Vec<String> = tokens.iter().map(|t| t.as_ref().to_owned()).collect();
        if tokens.is_empty() {
            return;
        }
        self.inner
            .deferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((cache.clone(), tokens));
        self.inner.start_retry();
    }

    /// The `after_bump` hook for an outbox relay (`icache::db`'s
    /// `RelayBuilder::after_bump`, features `postgres`/`sqlite`):
    /// purges each batch's tokens. While the proxy has refused for less
    /// than [`RELAY_HOLD`], a failure is the batch's (its rows stay and the
    /// relay retries them: purges at least once, also across a relay that
    /// dies); once it has refused for longer, the batch's purge waits in
    /// this purger instead (retried in the background until the proxy
    /// takes it) and the relay goes on, so a proxy that is down never holds
    /// back the bumps the site's own blocks need.
    ///
    /// # Example
    ///
    /// ```
    /// let purger = icache_http::Purger::from_url("http://127.0.0.1:6081")?;
    /// let hook = purger.relay_hook();
    /// // icache::db::Relay::builder(db_url, cache)?.after_bump(hook).spawn()?;
    /// # drop(hook);
    /// # Ok::<(), icache_http::PurgeError>(())
    /// ```
    pub fn relay_hook(&self) -> impl Fn(&[String]) -> Result<(), String> + Send + Sync + 'static {
        let purger = self.clone();
        move |tokens: &[String]| purger.purge_for_relay(tokens).map_err(|e| e.to_string())
    }

    /// What [`relay_hook`](Self::relay_hook) does, for relays that are not
    /// icache's own (Django's SQLite relay).
    ///
    /// # Errors
    ///
    /// [`PurgeErrorKind::Purge`] while the proxy has refused for less than
    /// [`RELAY_HOLD`]; after that `Ok`, the tokens pending here.
    pub fn purge_for_relay<S: AsRef<str>>(&self, tokens: &[S]) -> Result<(), PurgeError> {
        if self.inner.down_past_hold() {
            // Down for longer than the hold: no request of ours (a proxy
            // that hangs would cost each batch its time-outs); the retry
            // thread probes it and sends these when it answers.
            self.inner
                .remember(tokens.iter().map(|t| t.as_ref().to_owned()).collect(), true);
            return Ok(());
        }
        match self.purge(tokens) {
            Ok(()) => Ok(()),
            Err(e) => {
                let since = *self
                    .inner
                    .failing_since
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if since.is_some_and(|t| t.elapsed() >= self.inner.hold) {
                    // Pending here (the failed purge kept them), retried in
                    // the background.
                    tracing::warn!(
                        "icache-http: the proxy has refused purges for over {:?}: the relay goes on \
                         and the purges wait in the purger ({e})",
                        self.inner.hold
                    );
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Bumps `tokens` ([`ICache::incr_many`]), then purges their pages:
    /// for sites without an outbox relay. Returns the new generations.
    ///
    /// # Errors
    ///
    /// [`PurgeErrorKind::Bump`] when the bump failed (then nothing is
    /// purged; the handle replays the bump); [`PurgeErrorKind::Purge`] when
    /// the bump was done but the proxy could not be told: its pages of
    /// these tokens stay until a later purge of them, so call again.
    pub fn incr_and_purge(&self, cache: &ICache, tokens: &[&str]) -> Result<Vec<u64>, PurgeError> {
        let gens = cache.incr_many(tokens).map_err(|e| {
            PurgeError::new(
                PurgeErrorKind::Bump,
                format!("bump failed, nothing purged: {e}"),
            )
        })?;
        self.purge(tokens)?;
        Ok(gens)
    }
}

impl Inner {
    /// Every purge has failed for longer than the hold, and the retry
    /// thread is on it.
    fn down_past_hold(&self) -> bool {
        let since = *self
            .failing_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        since.is_some_and(|t| t.elapsed() >= self.hold) && self.retrying.load(Ordering::Acquire)
    }

    /// Sends `tokens` and everything pending; on failure keeps them all
    /// pending and makes sure the retry thread runs.
    fn purge(self: &Arc<Self>, mut all: Vec<String>) -> Result<(), PurgeError> {
        all.append(&mut self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        all.sort_unstable();
        all.dedup();
        let out = self.purge_now(&all);
        let mut since = self
            .failing_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &out {
            Ok(()) => *since = None,
            Err(_) => {
                since.get_or_insert_with(Instant::now);
                drop(since);
                self.remember(all, true);
            }
        }
        out
    }

    /// Adds tokens to the pending ones (bounded) and, if `retry`, starts
    /// the retry thread if it is not running.
    fn remember(self: &Arc<Self>, tokens: Vec<String>, retry: bool) {
        if tokens.is_empty() {
            return;
        }
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.extend(tokens);
            pending.sort_unstable();
            pending.dedup();
            if pending.len() > MAX_PENDING {
                // Dropping any would leave its pages at the proxy forever:
                // the flush token's key, on every tagged page, purges them
                // all at once instead.
                let dropped = pending.len();
                pending.clear();
                pending.push(ICache::FLUSH_TOKEN.to_owned());
                tracing::warn!(
                    dropped,
                    "icache-http: too many purges pending; they are replaced by one purge of \
                     every tagged page (the flush token's key)"
                );
            }
        }
        if retry {
            self.start_retry();
        }
    }

    /// Starts the retry thread unless it runs.
    fn start_retry(self: &Arc<Self>) {
        if !self.retrying.swap(true, Ordering::AcqRel) {
            let weak = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("icache-purge-retry".into())
                .spawn(move || retry_pending(weak));
            if spawned.is_err() {
                // No thread: the next purge still carries what is pending.
                self.retrying.store(false, Ordering::Release);
            }
        }
    }

    /// The deferred purges whose handle has replayed its bumps, moved to
    /// the pending ones; whether any is left waiting.
    fn release_deferred(&self) -> bool {
        let mut deferred = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ready = Vec::new();
        deferred.retain_mut(|(cache, tokens)| {
            if cache.has_pending_bumps() {
                true
            } else {
                ready.append(tokens);
                false
            }
        });
        let waiting = !deferred.is_empty();
        drop(deferred);
        if !ready.is_empty() {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.extend(ready);
            pending.sort_unstable();
            pending.dedup();
        }
        waiting
    }

    /// Nothing pending nor deferred.
    fn idle(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
            && self
                .deferred
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
    }

    fn purge_now(&self, tokens: &[String]) -> Result<(), PurgeError> {
        let mut keys: Vec<String> = tokens.iter().map(|t| surrogate_key(t)).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(());
        }
        match &self.target {
            Target::Varnish { url } => {
                let mut batch = String::new();
                for k in &keys {
                    if !batch.is_empty() && batch.len() + 1 + k.len() > VARNISH_HEADER_BYTES {
                        self.send(|| varnish_request(url, &batch))?;
                        batch.clear();
                    }
                    if !batch.is_empty() {
                        batch.push(' ');
                    }
                    batch.push_str(k);
                }
                self.send(|| varnish_request(url, &batch))
            }
            Target::Fastly {
                api,
                service,
                token,
            } => keys.chunks(FASTLY_KEYS).try_for_each(|chunk| {
                self.send(|| {
                    http::Request::post(format!("{api}/service/{service}/purge"))
                        .header("fastly-key", token.as_str())
                        .header("surrogate-key", chunk.join(" "))
                        .header("accept", "application/json")
                        .body(String::new())
                })
            }),
            Target::Cloudflare { api, zone, token } => {
                keys.chunks(CLOUDFLARE_TAGS).try_for_each(|chunk| {
                    // Keys are [a-z2-7]: nothing to escape in the JSON.
                    let tags: Vec<String> = chunk.iter().map(|k| format!("\"{k}\"")).collect();
                    self.send(|| {
                        http::Request::post(format!("{api}/zones/{zone}/purge_cache"))
                            .header("authorization", format!("Bearer {token}"))
                            .header("content-type", "application/json")
                            .body(format!("{{\"tags\":[{}]}}", tags.join(",")))
                    })
                })
            }
        }
    }

    /// Sends one request (built anew for each try), retrying failures.
    fn send(
        &self,
        build: impl Fn() -> http::Result<http::Request<String>>,
    ) -> Result<(), PurgeError> {
        let mut pause = Duration::from_millis(50);
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let request = build().map_err(|e| {
                PurgeError::new(
                    PurgeErrorKind::Config,
                    format!("purge for {:?}: {e}", self.target),
                )
            })?;
            match self.agent.run(request) {
                Ok(resp) if resp.status().is_success() => {
                    self.ok.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("icache_http_purges_total", "result" => "ok").increment(1);
                    return Ok(());
                }
                Ok(mut resp) => {
                    let status = resp.status();
                    let body = resp.body_mut().read_to_string().unwrap_or_default();
                    let body: String = body.chars().take(300).collect();
                    last = format!("answered {status}: {}", body.trim());
                    // A refusal is not going to change: no retry.
                    if status.is_client_error() && status != http::StatusCode::TOO_MANY_REQUESTS {
                        break;
                    }
                }
                Err(e) => last = format!("did not answer: {e}"),
            }
            if attempt < ATTEMPTS {
                std::thread::sleep(pause);
                pause *= 2;
            }
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("icache_http_purges_total", "result" => "error").increment(1);
        let message = format!("purge at {:?} failed: {last}", self.target);
        tracing::warn!("icache-http: {message}");
        Err(PurgeError::new(PurgeErrorKind::Purge, message))
    }
}

fn varnish_request(url: &str, keys: &str) -> http::Result<http::Request<String>> {
    http::Request::builder()
        .method(http::Method::from_bytes(b"PURGE").map_err(http::Error::from)?)
        .uri(format!("{url}/"))
        .header("xkey-purge", keys)
        .body(String::new())
}

/// The retry thread: sends what is pending (and the deferred purges whose
/// bumps were replayed), with a doubling pause, until nothing is left (or
/// the purger is gone).
fn retry_pending(weak: Weak<Inner>) {
    let mut pause = RETRY_FIRST;
    loop {
        std::thread::sleep(pause);
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let waiting = inner.release_deferred();
        let empty = inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty();
        if empty {
            if waiting {
                pause = (pause * 2).min(RETRY_MAX);
                continue;
            }
            inner.retrying.store(false, Ordering::Release);
            // Something remembered between the check and the store started
            // no thread (it saw this one running): look once more.
            if !inner.idle() && !inner.retrying.swap(true, Ordering::AcqRel) {
                continue;
            }
            return;
        }
        pause = match inner.purge(Vec::new()) {
            Ok(()) => RETRY_FIRST,
            Err(_) => (pause * 2).min(RETRY_MAX),
        };
    }
}
