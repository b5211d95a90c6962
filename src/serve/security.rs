//! Request guard and response headers, in one middleware around every route:
//! - **Host** must be an IP literal, `localhost`, or an `--allow-host` name: a DNS-rebinding
//!   page reaches us under its own name and is refused.
//! - **Cross-site requests** are refused: a state-changing request whose `Origin` is not this
//!   host, and any `/api/` request a browser marks `Sec-Fetch-Site: cross-site`.
//! - **Token** (with `--token-file`): `Authorization: Bearer T` or the `loracast_token` cookie,
//!   compared in constant time (SHA-256 of both, then `subtle`); the page gets the cookie once
//!   from `/?token=T` (the URL `serve` prints), which sets it HttpOnly + SameSite=Strict and
//!   redirects to `/`. `/api/health` is open.
//! - Every response: `X-Content-Type-Options: nosniff`, CSP `default-src 'self'` (images also
//!   from `blob:` for the upload thumbnails), `X-Frame-Options: DENY` +
//!   `frame-ancestors 'none'`, `Referrer-Policy: no-referrer`.
use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;

pub const COOKIE: &str = "loracast_token";

#[derive(Debug, Clone, Default)]
pub struct Guard {
    token_digest: Option<[u8; 32]>,
    allowed_hosts: Vec<String>,
}

impl Guard {
    pub fn new(token: Option<&str>, allowed_hosts: &[String]) -> Self {
        Self {
            token_digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
            allowed_hosts: allowed_hosts.iter().map(|h| h.to_lowercase()).collect(),
        }
    }

    fn token_ok(&self, given: &str) -> bool {
        match &self.token_digest {
            None => true,
            Some(d) => {
                let g: [u8; 32] = Sha256::digest(given.as_bytes()).into();
                g.ct_eq(d).into()
            }
        }
    }

    fn host_ok(&self, host: &str) -> bool {
        let name = host_name(host).to_lowercase();
        name == "localhost" || name.parse::<IpAddr>().is_ok() || self.allowed_hosts.contains(&name)
    }
}

/// `host:port`, `[v6]:port` or `host` → the name or address without the port and brackets.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn cookie_token(h: &HeaderMap) -> Option<&str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

fn query_token(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| v)
}

fn refuse(status: StatusCode, error: &str, hint: &str) -> Response {
    ApiError::new(status, error).hint(hint).into_response()
}

/// The middleware.
pub async fn guard(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let mut resp = check(&g, req, next).await;
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; img-src 'self' blob: data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    );
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "no-referrer");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, header::CACHE_CONTROL, "no-store");
    }
    resp
}

async fn check(g: &Guard, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = header_str(headers, &header::HOST)
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    if !g.host_ok(&host) {
        return refuse(
            StatusCode::FORBIDDEN,
            &format!("Host {host:?} is not allowed"),
            "use an IP address or localhost, or start serve with --allow-host NAME",
        );
    }
    let path = req.uri().path().to_string();
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if let Some(origin) = header_str(headers, &header::ORIGIN) {
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(&host));
        if !safe && !same {
            return refuse(
                StatusCode::FORBIDDEN,
                &format!("cross-site request from {origin:?} refused"),
                "use the page served at / on this host",
            );
        }
    }
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site");
    if cross_site && (path.starts_with("/api/") || !safe) {
        return refuse(
            StatusCode::FORBIDDEN,
            "cross-site request refused",
            "use the page served at / on this host",
        );
    }
    if g.token_digest.is_some() && path != "/api/health" {
        // The page's one-time login: /?token=T sets the cookie.
        if path == "/" {
            if let Some(t) = query_token(req.uri().query()) {
                if !g.token_ok(t) {
                    return refuse(
                        StatusCode::UNAUTHORIZED,
                        "wrong token",
                        "check --token-file",
                    );
                }
                let cookie = format!("{COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/");
                let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    resp.headers_mut().insert(header::SET_COOKIE, v);
                }
                return resp;
            }
        }
        let bearer = header_str(headers, &header::AUTHORIZATION)
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim);
        let given = bearer.or_else(|| cookie_token(headers));
        match given {
            Some(t) if g.token_ok(t) => {}
            Some(_) => {
                return refuse(StatusCode::UNAUTHORIZED, "wrong token", "check --token-file")
            }
            None => {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "a token is required",
                    "send Authorization: Bearer <token>, or open the URL loracast serve printed (/?token=…) once",
                )
            }
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let g = Guard::new(None, &["box.lan".to_string()]);
        for ok in [
            "127.0.0.1:80",
            "localhost:7878",
            "[::1]:9",
            "10.0.0.2",
            "BOX.lan:1",
        ] {
            assert!(g.host_ok(ok), "{ok}");
        }
        for bad in ["evil.example:7878", "", "localhost.evil.com"] {
            assert!(!g.host_ok(bad), "{bad}");
        }
    }

    #[test]
    fn tokens() {
        let g = Guard::new(Some("abcdefghijklmnop"), &[]);
        assert!(g.token_ok("abcdefghijklmnop"));
        assert!(!g.token_ok("abcdefghijklmnoq"));
        assert!(!g.token_ok(""));
    }
}
