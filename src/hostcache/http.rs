//! The little HTTP/1.1 the cache speaks: `GET` and `HEAD` without bodies, keep-alive,
//! `Content-Length` on every response. Nix's curl asks for nothing else of a binary
//! cache reached over plain `http://` (no TLS, so no HTTP/2).

/// The longest request head read; Nix's are a few hundred bytes.
pub const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path, without a query string.
    pub path: String,
    /// The client asked to keep the connection (HTTP/1.1 without `Connection: close`).
    pub keep_alive: bool,
}

/// Why a request head was refused; each is answered with `status` and the
/// connection is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub reason: &'static str,
}

const fn refused(status: u16, reason: &'static str) -> Refused {
    Refused { status, reason }
}

/// Where the head ends (the index just past `\r\n\r\n`), once `buffer` holds it.
pub fn head_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// Parses a request head (everything up to and including the blank line).
pub fn parse(head: &[u8]) -> Result<Request, Refused> {
    let bad = refused(400, "Bad Request");
    let text = std::str::from_utf8(head).map_err(|_| bad.clone())?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or_else(|| bad.clone())?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad);
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(refused(505, "HTTP Version Not Supported")),
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| bad.clone())?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "connection" => {
                let tokens = value.to_ascii_lowercase();
                if tokens.split(',').any(|t| t.trim() == "close") {
                    keep_alive = false;
                } else if tokens.split(',').any(|t| t.trim() == "keep-alive") {
                    keep_alive = true;
                }
            }
            // A body would have to be read and thrown away; no client of a binary
            // cache sends one with GET or HEAD.
            "content-length" if value != "0" => return Err(refused(413, "Content Too Large")),
            "transfer-encoding" => return Err(refused(413, "Content Too Large")),
            _ => {}
        }
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => return Err(refused(405, "Method Not Allowed")),
    };
    if !target.starts_with('/') {
        return Err(bad);
    }
    let path = target.split('?').next().unwrap_or_default().to_string();
    Ok(Request {
        method,
        path,
        keep_alive,
    })
}

/// A response head with a body of `length` bytes.
pub fn response_head(
    status: u16,
    reason: &str,
    content_type: &str,
    length: u64,
    keep_alive: bool,
) -> String {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: {connection}\r\n\r\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_curl_request_parses_and_keeps_the_connection() {
        let head = b"GET /nix-cache-info HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/7.88 Nix/2.8.0\r\nAccept: */*\r\n\r\n";
        assert_eq!(head_end(head), Some(head.len()));
        assert_eq!(
            parse(head),
            Ok(Request {
                method: Method::Get,
                path: "/nix-cache-info".into(),
                keep_alive: true,
            })
        );
        let head = b"HEAD /x.narinfo?y=1 HTTP/1.0\r\n\r\n";
        assert_eq!(
            parse(head),
            Ok(Request {
                method: Method::Head,
                path: "/x.narinfo".into(),
                keep_alive: false,
            })
        );
        let head = b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n";
        assert!(!parse(head).unwrap().keep_alive);
    }

    #[test]
    fn what_a_cache_client_never_sends_is_refused_with_a_4xx() {
        let status = |head: &[u8]| parse(head).unwrap_err().status;
        assert_eq!(status(b"POST /x HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status(b"GET /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n"), 413);
        assert_eq!(
            status(b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            413
        );
        assert_eq!(status(b"GET /x HTTP/2\r\n\r\n"), 505);
        assert_eq!(status(b"GET x HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET  /x HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET /x HTTP/1.1\r\nno colon\r\n\r\n"), 400);
        assert_eq!(status(b"GET /\xff HTTP/1.1\r\n\r\n"), 400);
    }
}
