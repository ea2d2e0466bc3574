//! The handler a restart upgrades to: `Congratulation! Server has been upgraded.` on
//! `/`, plus the test routes of `demo-routes`.

use demo_routes::{Signals, route};
use gem_plugin::{Plugin, Request, Response};

struct Upgraded {
    signals: Signals,
}

impl Plugin for Upgraded {
    const HAS_SIGNAL_HOOK: bool = true;

    fn init() -> Result<Self, String> {
        Ok(Upgraded {
            signals: Signals::default(),
        })
    }

    fn handle(&self, req: &Request<'_>) -> Response {
        route(
            req,
            "Congratulation! Server has been upgraded.",
            &self.signals,
        )
    }

    fn on_signal(&self, signo: i32) {
        self.signals.record(signo);
    }
}

gem_plugin::export_plugin!(Upgraded);
