//! Test-only: a plugin whose `init` sleeps `GEM_TEST_INIT_SLEEP_MS` ms (default 10
//! minutes), to prove that a new process stuck in init is rolled back.
//! `SLOW_INIT_MS` is the older name of the same variable, still used by tests.

use std::time::Duration;

use gem_plugin::{Plugin, Request, Response};

struct SlowInit;

impl Plugin for SlowInit {
    fn init() -> Result<Self, String> {
        let ms = ["GEM_TEST_INIT_SLEEP_MS", "SLOW_INIT_MS"]
            .into_iter()
            .find_map(|name| std::env::var(name).ok()?.parse().ok())
            .unwrap_or(600_000);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(SlowInit)
    }

    fn handle(&self, _req: &Request<'_>) -> Response {
        Response::text(200, "finally")
    }
}

gem_plugin::export_plugin!(SlowInit);
