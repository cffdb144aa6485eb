//! fhe-client: talks to an fhe-lora server. Reuses connections, times requests out, retries
//! with exponential backoff while the server is busy (503) or unreachable, and turns every
//! other refusal into an error that carries the server's own explanation.

use std::path::PathBuf;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhe_backend_rlwe::{Reply, Transport};
use fhe_ir::{Direction, LayerId};
use serde::Deserialize;
use ureq::tls::{Certificate, RootCerts, TlsConfig};
use ureq::Agent;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server {url} answered {status}: {message}")]
    Refused { url: String, status: u16, message: String },
    #[error("server {url} unreachable for {waited:?} ({last}); is `fhe-run server` running there?")]
    Unreachable { url: String, waited: Duration, last: String },
    #[error("bad server response from {url}: {what}")]
    BadResponse { url: String, what: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub base_url: String,
    pub token: Option<String>,
    /// Per request, including the server's computation.
    pub timeout: Duration,
    /// How long to keep retrying while the server is busy or away.
    pub retry_for: Duration,
    /// First backoff; it doubles up to 5 s.
    pub backoff: Duration,
    /// PEM certificate to trust (a self-signed server); otherwise the web PKI roots.
    pub ca_cert: Option<PathBuf>,
    /// Largest accepted response body.
    pub max_response: u64,
}

impl ClientConfig {
    pub fn new(base_url: impl Into<String>) -> ClientConfig {
        ClientConfig {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            token: None,
            timeout: Duration::from_secs(600),
            retry_for: Duration::from_secs(300),
            backoff: Duration::from_millis(100),
            ca_cert: None,
            max_response: 1 << 31,
        }
    }
}

/// One layer of the server's table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct LayerInfo {
    pub id: u32,
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// What `GET /v1/info` says.
#[derive(Clone, Debug, Deserialize)]
pub struct ServerInfo {
    pub protocol_version: u16,
    pub parameter_set: String,
    pub parameter_set_id: u16,
    pub model_sha256: String,
    pub layers: Vec<LayerInfo>,
}

pub struct HttpClient {
    agent: Agent,
    config: ClientConfig,
}

enum Attempt {
    Done(Reply),
    /// Worth retrying: busy (with the server's Retry-After) or no connection.
    Retry(String, Option<Duration>),
    Fail(ClientError),
}

impl HttpClient {
    pub fn new(config: ClientConfig) -> Result<HttpClient, ClientError> {
        let mut tls = TlsConfig::builder();
        if let Some(path) = &config.ca_cert {
            let pem = std::fs::read(path).map_err(|e| ClientError::Tls(format!("cannot read {}: {e}", path.display())))?;
            let cert = Certificate::from_pem(&pem).map_err(|e| ClientError::Tls(format!("{}: {e}", path.display())))?.to_owned();
            tls = tls.root_certs(RootCerts::Specific(Arc::new(vec![cert])));
        }
        let agent = Agent::config_builder()
            .timeout_global(Some(config.timeout))
            .http_status_as_error(false)
            .tls_config(tls.build())
            .build()
            .into();
        Ok(HttpClient { agent, config })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.base_url)
    }

    fn attempt(&self, path: &str, body: Option<&[u8]>) -> Attempt {
        let url = self.url(path);
        let result = match body {
            Some(body) => {
                let mut request = self.agent.post(&url).header("content-type", "application/octet-stream");
                if let Some(token) = &self.config.token {
                    request = request.header("authorization", &format!("Bearer {token}"));
                }
                request.send(body)
            }
            None => {
                let mut request = self.agent.get(&url);
                if let Some(token) = &self.config.token {
                    request = request.header("authorization", &format!("Bearer {token}"));
                }
                request.call()
            }
        };
        let mut response = match result {
            Ok(r) => r,
            Err(e @ (ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound | ureq::Error::Timeout(_))) => {
                return Attempt::Retry(e.to_string(), None);
            }
            Err(e) => return Attempt::Fail(ClientError::BadResponse { url, what: e.to_string() }),
        };
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).map(Duration::from_secs);
        let server_time = response.headers().get("server-timing").and_then(|v| v.to_str().ok()).and_then(parse_server_timing);
        // Sized from Content-Length up front: growing a Vec by doubling would briefly hold
        // twice a 44 MB response, at the client's memory peak.
        let expected = response.body().content_length().unwrap_or(0).min(self.config.max_response);
        let mut bytes = Vec::with_capacity(expected as usize);
        if let Err(e) = response.body_mut().with_config().limit(self.config.max_response).reader().read_to_end(&mut bytes) {
            return Attempt::Retry(format!("reading the response: {e}"), None);
        }
        match status {
            200 => Attempt::Done(Reply { body: bytes, server_time }),
            503 => Attempt::Retry("server busy (503)".into(), retry_after),
            _ => {
                let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
                Attempt::Fail(ClientError::Refused { url, status, message })
            }
        }
    }

    /// One request with retries: busy and unreachable servers are waited for, up to
    /// `retry_for`; anything else fails at once.
    fn request(&self, path: &str, body: Option<&[u8]>) -> Result<Reply, ClientError> {
        let start = Instant::now();
        let mut backoff = self.config.backoff;
        loop {
            match self.attempt(path, body) {
                Attempt::Done(reply) => return Ok(reply),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(why, hint) => {
                    if start.elapsed() >= self.config.retry_for {
                        return Err(ClientError::Unreachable { url: self.url(path), waited: start.elapsed(), last: why });
                    }
                    let wait = hint.unwrap_or(backoff).min(Duration::from_secs(5));
                    tracing::warn!("{}: {why}; retrying in {wait:?}", self.url(path));
                    std::thread::sleep(wait);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    pub fn info(&self) -> Result<ServerInfo, ClientError> {
        let reply = self.request("/v1/info", None)?;
        serde_json::from_slice(&reply.body).map_err(|e| ClientError::BadResponse { url: self.url("/v1/info"), what: e.to_string() })
    }

    /// One encrypted linear call; the reply carries the server's compute time when it
    /// reports one.
    pub fn linear(&self, layer: LayerId, direction: Direction, body: &[u8]) -> Result<Reply, ClientError> {
        self.request(&format!("/v1/linear/{}/{direction}", layer.0), Some(body))
    }
}

/// The `compute` metric of a `Server-Timing` header (`compute;dur=12.5`, milliseconds).
fn parse_server_timing(header: &str) -> Option<Duration> {
    let metric = header.split(',').map(str::trim).find(|m| m.split(';').next() == Some("compute"))?;
    let ms: f64 = metric.split(';').find_map(|p| p.trim().strip_prefix("dur="))?.parse().ok()?;
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1e3))
}

impl Transport for HttpClient {
    fn call(&self, layer: LayerId, direction: Direction, body: Vec<u8>) -> Result<Reply, String> {
        self.linear(layer, direction, &body).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_header() {
        assert_eq!(parse_server_timing("compute;dur=12.5"), Some(Duration::from_micros(12_500)));
        assert_eq!(parse_server_timing("db;dur=1, compute;desc=\"x\";dur=2"), Some(Duration::from_millis(2)));
        assert_eq!(parse_server_timing("db;dur=1"), None);
        assert_eq!(parse_server_timing("compute;dur=-1"), None);
        assert_eq!(parse_server_timing("compute;dur=abc"), None);
    }
}
