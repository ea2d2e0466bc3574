//! Test-only: a plugin whose `init` sleeps `SLOW_INIT_MS` ms (default 10 minutes), to
//! prove that a new process stuck in init is rolled back. (Not a `GEM_` name: gem
//! would warn about an environment variable that is not one of its settings.)

use std::time::Duration;

use gem_plugin::{Plugin, Request, Response};

struct SlowInit;

impl Plugin for SlowInit {
    fn init() -> Result<Self, String> {
        let ms = std::env::var("SLOW_INIT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600_000);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(SlowInit)
    }

    fn handle(&self, _req: &Request<'_>) -> Response {
        Response::text(200, "finally")
    }
}

gem_plugin::export_plugin!(SlowInit);
