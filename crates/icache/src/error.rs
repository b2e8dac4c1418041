//! The one error type of the crate.

use std::fmt;

/// What kind of failure an [`Error`] is. Match on it, or use the `is_*` predicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The cache URL or an option is wrong; the message names the offending part.
    Config,
    /// The backend could not be reached, or the connection broke.
    Unavailable,
    /// The backend did not answer within the configured time-out.
    Timeout,
    /// The value is larger than the backend accepts (memcached's item size, the
    /// memory backend's byte bound). Nothing was stored.
    TooLarge,
    /// The backend answered something we did not expect (a server error, a
    /// protocol violation).
    Backend,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Config => "bad configuration",
            ErrorKind::Unavailable => "backend unavailable",
            ErrorKind::Timeout => "backend timed out",
            ErrorKind::TooLarge => "value too large",
            ErrorKind::Backend => "backend error",
        })
    }
}

/// The error of every fallible icache operation.
///
/// Messages name what was wrong and where; they never contain passwords.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    /// Refused without asking the server: its circuit breaker is open.
    circuit_open: bool,
}

/// `Result<T, icache::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
            circuit_open: false,
        }
    }

    #[cfg(any(feature = "redis", feature = "memcached"))]
    /// An [`Unavailable`](ErrorKind::Unavailable) error returned at once,
    /// without asking the server, because it failed recently.
    pub(crate) fn circuit_open(message: impl Into<String>) -> Self {
        let mut e = Error::new(ErrorKind::Unavailable, message);
        e.circuit_open = true;
        e
    }

    #[cfg(any(feature = "redis", feature = "memcached"))]
    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The cache URL or an option is wrong.
    pub fn is_config(&self) -> bool {
        self.kind == ErrorKind::Config
    }

    /// The backend could not be reached or the connection broke.
    pub fn is_unavailable(&self) -> bool {
        self.kind == ErrorKind::Unavailable
    }

    /// The backend did not answer in time.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    /// The value was too large for the backend; nothing was stored.
    pub fn is_too_large(&self) -> bool {
        self.kind == ErrorKind::TooLarge
    }

    /// The backend answered with an error or something unexpected.
    pub fn is_backend(&self) -> bool {
        self.kind == ErrorKind::Backend
    }

    /// `true` if the call failed fast, without reaching the server, because
    /// the server failed recently and its back-off period is not over (a
    /// circuit breaker). Always [`is_unavailable`](Self::is_unavailable) too.
    ///
    /// # Example
    ///
    /// ```
    /// # #[cfg(feature = "redis")] {
    /// // Nothing listens on port 1: the first call fails, the next ones
    /// // fail fast for a back-off period.
    /// let cache = icache::ICache::from_url("redis://127.0.0.1:1?timeout_ms=50")?;
    /// assert!(!cache.ping().unwrap_err().is_circuit_open());
    /// assert!(cache.ping().unwrap_err().is_circuit_open());
    /// # }
    /// # Ok::<(), icache::Error>(())
    /// ```
    pub fn is_circuit_open(&self) -> bool {
        self.circuit_open
    }

    /// Unavailable or timed out: the failures that fail-open code treats as
    /// "the cache is down right now".
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable | ErrorKind::Timeout)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", &source.to_string());
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(feature = "memcached")]
/// Maps an I/O error from a socket to our kinds.
pub(crate) fn from_io(context: &str, err: std::io::Error) -> Error {
    use std::io::ErrorKind as Io;
    let kind = match err.kind() {
        Io::TimedOut | Io::WouldBlock => ErrorKind::Timeout,
        _ => ErrorKind::Unavailable,
    };
    Error::new(kind, context.to_string()).with_source(err)
}
