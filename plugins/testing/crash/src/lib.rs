//! Test-only: a plugin that loads fine and then aborts the whole process on every
//! request, to prove that a generation that dies after taking over is rolled back
//! (probation) and that a supervisor replaces a crashed worker with backoff.

use gem_plugin::{Plugin, Request, Response};

struct Crash;

impl Plugin for Crash {
    fn init() -> Result<Self, String> {
        Ok(Crash)
    }

    fn handle(&self, _req: &Request<'_>) -> Response {
        // Not a panic: the SDK turns a panic into a 500. An abort takes the process down.
        std::process::abort()
    }
}

gem_plugin::export_plugin!(Crash);
