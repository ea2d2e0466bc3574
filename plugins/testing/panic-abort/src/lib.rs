//! Test-only: a plugin meant to be built with `-C panic=abort`, which gem must refuse by
//! name, since `catch_unwind` cannot stop its panics: built that way, `GET /panic` would
//! abort the whole server. Built normally (unwind) it is an ordinary plugin.

use gem_plugin::{Plugin, Request, Response};

struct Aborts;

impl Plugin for Aborts {
    fn init() -> Result<Self, String> {
        Ok(Aborts)
    }

    fn handle(&self, req: &Request<'_>) -> Response {
        match req.path() {
            "/panic" => panic!("panic-abort panics on purpose"),
            _ => Response::text(200, "abort plugin"),
        }
    }
}

gem_plugin::export_plugin!(Aborts);
