//! The demo handler: `Hello world.` on `/`, plus the test routes of `demo-routes`.

use demo_routes::{Signals, route};
use gem_plugin::{Plugin, Request, Response};

struct Hello {
    signals: Signals,
}

impl Plugin for Hello {
    const HAS_SIGNAL_HOOK: bool = true;

    fn init() -> Result<Self, String> {
        Ok(Hello {
            signals: Signals::default(),
        })
    }

    fn handle(&self, req: &Request<'_>) -> Response {
        route(req, "Hello world.", &self.signals)
    }

    fn on_signal(&self, signo: i32) {
        self.signals.record(signo);
    }
}

gem_plugin::export_plugin!(Hello);
