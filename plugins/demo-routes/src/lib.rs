//! The demo handler shared by the `hello` and `upgraded` plugins: the same test routes,
//! each plugin with its own greeting on `/`.

use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::Duration;

use gem_plugin::{Plugin, Request, Response};

/// The text a demo plugin answers on `/`.
pub trait Greeting: Send + Sync + 'static {
    /// The greeting.
    const TEXT: &'static str;
}

/// A demo plugin greeting with `G`: export it with
/// `gem_plugin::export_plugin!(demo_routes::Demo<MyGreeting>)`.
#[derive(Debug)]
pub struct Demo<G> {
    signals: Signals,
    greeting: PhantomData<fn() -> G>,
}

impl<G: Greeting> Plugin for Demo<G> {
    const HAS_SIGNAL_HOOK: bool = true;

    fn init() -> Result<Self, String> {
        Ok(Demo {
            signals: Signals::default(),
            greeting: PhantomData,
        })
    }

    fn handle(&self, req: &Request<'_>) -> Response {
        route(req, G::TEXT, &self.signals)
    }

    fn on_signal(&self, signo: i32) {
        self.signals.record(signo);
    }
}

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
