//! Which `Host` names the server answers to. A server bound to a loopback address answers only
//! to loopback names, so that a web page whose domain an attacker points at 127.0.0.1 (DNS
//! rebinding) cannot read it; `server.allowed_hosts` names others.

use actix_web::HttpRequest;

use super::errors::ApiError;

/// The names allowed, or any.
#[derive(Debug, Clone)]
pub struct AllowedHosts(Option<Vec<String>>);

/// What a loopback-bound server answers to when no list is configured.
const LOOPBACK_NAMES: [&str; 4] = ["localhost", "127.0.0.1", "::1", "*.localhost"];

impl AllowedHosts {
    /// `configured` (`"*"` for any); when empty, the loopback names if `bind_host` is a
    /// loopback address, else any.
    pub fn new(configured: &[String], bind_host: &str) -> Self {
        if configured.iter().any(|h| h.trim() == "*") {
            return Self(None);
        }
        if !configured.is_empty() {
            return Self(Some(configured.iter().map(|h| h.trim().to_ascii_lowercase()).collect()));
        }
        let loopback = bind_host == "localhost"
            || bind_host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        Self(loopback.then(|| LOOPBACK_NAMES.iter().map(|h| h.to_string()).collect()))
    }

    /// A 403 for a request naming a host not allowed; requests without a `Host` (HTTP/1.0)
    /// pass, as no browser sends one.
    pub fn refuses(&self, req: &HttpRequest) -> Option<ApiError> {
        let allowed = self.0.as_ref()?;
        let host = req.headers().get(actix_web::http::header::HOST)?.to_str().unwrap_or("");
        let name = host_name(host);
        if matches_host(allowed, name) {
            return None;
        }
        let message = format!("this server does not answer to the host {name:?} (server.allowed_hosts)");
        Some(ApiError::forbidden("host_not_allowed", message))
    }
}

/// The name of a `Host` header's `name[:port]` or `[v6]:port`.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(v6) = host.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// Whether `host` is one of `allowed` (lower case), where `*.example.com` allows the subdomains
/// of example.com.
pub fn matches_host(allowed: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    allowed.iter().any(|pattern| match pattern.strip_prefix("*.") {
        Some(domain) => host.strip_suffix(domain).is_some_and(|sub| sub.ends_with('.')),
        None => *pattern == host,
    })
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;

    use super::*;

    fn refused(hosts: &AllowedHosts, host: &str) -> bool {
        hosts.refuses(&TestRequest::default().insert_header(("host", host)).to_http_request()).is_some()
    }

    #[test]
    fn a_loopback_server_answers_only_to_loopback_names() {
        let hosts = AllowedHosts::new(&[], "127.0.0.1");
        for ok in ["localhost:8080", "127.0.0.1", "[::1]:80", "app.localhost", "LOCALHOST"] {
            assert!(!refused(&hosts, ok), "{ok}");
        }
        for bad in ["evil.example:8080", "127.0.0.1.evil.example", "localhost.evil.example", ""] {
            assert!(refused(&hosts, bad), "{bad}");
        }
        let error = hosts.refuses(&TestRequest::default().insert_header(("host", "x.test")).to_http_request());
        assert_eq!(error.map(|e| e.status.as_u16()), Some(403));
        assert!(!refused(&AllowedHosts::new(&[], "0.0.0.0"), "anything.example"), "bound to all: any name");
        let listed = AllowedHosts::new(&["vlm.example.com".into(), "*.internal".into()], "0.0.0.0");
        assert!(!refused(&listed, "vlm.example.com:443") && !refused(&listed, "a.b.internal"));
        assert!(refused(&listed, "internal") && refused(&listed, "localhost"));
        assert!(!refused(&AllowedHosts::new(&["*".into()], "127.0.0.1"), "x.example"));
    }
}
