//! The safe request and response types that plugin authors (and in-process handlers) see.

/// A request as seen by a handler. Everything is borrowed from the host for the duration
/// of one call.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    method: &'a str,
    target: &'a str,
    headers: Vec<(&'a str, &'a [u8])>,
    body: &'a [u8],
}

impl<'a> Request<'a> {
    /// Builds a request view. `target` is the path with its optional `?query`.
    pub fn new(
        method: &'a str,
        target: &'a str,
        headers: Vec<(&'a str, &'a [u8])>,
        body: &'a [u8],
    ) -> Self {
        Request {
            method,
            target,
            headers,
            body,
        }
    }

    /// The method, e.g. `GET`.
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The request target as sent: the path and the optional `?query`.
    pub fn target(&self) -> &'a str {
        self.target
    }

    /// The path, without the query.
    pub fn path(&self) -> &'a str {
        self.target.split_once('?').map_or(self.target, |(p, _)| p)
    }

    /// The raw query string after `?`, if any.
    pub fn query(&self) -> Option<&'a str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The first value of query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query()?
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The first value of header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// All headers in the order received.
    pub fn headers(&self) -> &[(&'a str, &'a [u8])] {
        &self.headers
    }

    /// The whole request body.
    pub fn body(&self) -> &'a [u8] {
        self.body
    }
}

/// A response built by a handler. gem validates the status and headers; invalid ones
/// turn into a 500 and a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code (100..=999 is accepted by gem).
    pub status: u16,
    /// Header names and values.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// An empty response with `status`.
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response::new(status)
            .with_header("content-type", "text/plain; charset=utf-8")
            .with_body(body.into().into_bytes())
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_helpers_split_the_target_and_find_headers() {
        let req = Request::new(
            "GET",
            "/sleep?ms=15&x&y=2",
            vec![("Content-Type", b"text/plain"), ("x-a", b"1")],
            b"body",
        );
        assert_eq!(req.path(), "/sleep");
        assert_eq!(req.query(), Some("ms=15&x&y=2"));
        assert_eq!(req.query_param("ms"), Some("15"));
        assert_eq!(req.query_param("x"), Some(""));
        assert_eq!(req.query_param("z"), None);
        assert_eq!(req.header("content-type"), Some(&b"text/plain"[..]));
        assert_eq!(req.header("missing"), None);
        assert_eq!(req.body(), b"body");
        let bare = Request::new("GET", "/", Vec::new(), b"");
        assert_eq!((bare.path(), bare.query()), ("/", None));
    }

    #[test]
    fn responses_build_up() {
        let r = Response::text(201, "hi").with_header("x-a", "1");
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"hi");
        assert!(r.headers.contains(&("x-a".to_owned(), "1".to_owned())));
    }
}
