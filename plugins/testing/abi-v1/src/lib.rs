//! Test-only: a plugin that claims plugin ABI 1, which this gem (ABI 2) must refuse by
//! name, as it refuses every plugin built against gem-plugin 0.1.
//!
//! It exports what an ABI-1 plugin exports first, `gem_plugin_abi_version` returning 1
//! (the symbol every ABI keeps), and gem stops there, before it looks at anything else.

use gem_plugin::{Plugin, Request, Response};

struct FromThePast;

impl Plugin for FromThePast {
    fn init() -> Result<Self, String> {
        Ok(FromThePast)
    }

    fn handle(&self, _req: &Request<'_>) -> Response {
        Response::text(200, "ABI 1")
    }
}

gem_plugin::export_plugin!(FromThePast, abi_version = 1);
