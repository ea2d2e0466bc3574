//! The routes shared by the `hello` and `upgraded` demo plugins; each answers `/` with
//! its own greeting.

use std::sync::Mutex;
use std::time::Duration;

use gem_plugin::{Request, Response};

/// Signals received through the `plugin` action, for `GET /signals`.
#[derive(Debug, Default)]
pub struct Signals(Mutex<Vec<i32>>);

impl Signals {
    /// Records one signal.
    pub fn record(&self, signo: i32) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(signo);
    }

    fn list(&self) -> String {
        let seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter().map(|s| format!("{s}\n")).collect()
    }
}

/// - `GET /`: the greeting.
/// - `GET /sleep?ms=N`: sleeps N ms (default 1000), then the greeting.
/// - `GET /panic`: panics (gem answers 500).
/// - `POST /echo`: the request body.
/// - `GET /signals`: signal numbers received by `on_signal`, one per line.
/// - `GET /bad-status`, `GET /bad-header`: invalid responses (gem answers 500).
pub fn route(req: &Request<'_>, greeting: &str, signals: &Signals) -> Response {
    match (req.method(), req.path()) {
        ("GET", "/") => Response::text(200, greeting),
        ("GET", "/sleep") => {
            let ms = req
                .query_param("ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1000);
            std::thread::sleep(Duration::from_millis(ms));
            Response::text(200, greeting)
        }
        ("GET", "/panic") => panic!("the /panic route panics on purpose"),
        ("POST", "/echo") => Response::new(200)
            .with_header("content-type", "application/octet-stream")
            .with_body(req.body()),
        ("GET", "/signals") => Response::text(200, signals.list()),
        ("GET", "/bad-status") => Response::text(1000, "no such status"),
        ("GET", "/bad-header") => Response::text(200, "bad").with_header("bad name", "x"),
        _ => Response::text(404, "not found\n"),
    }
}
