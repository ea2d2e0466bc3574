//! Test-only: a plugin that claims plugin ABI 2, which gem must refuse by name.

use gem_plugin::{Plugin, Request, Response};

struct FromTheFuture;

impl Plugin for FromTheFuture {
    fn init() -> Result<Self, String> {
        Ok(FromTheFuture)
    }

    fn handle(&self, _req: &Request<'_>) -> Response {
        Response::text(200, "ABI 2")
    }
}

gem_plugin::export_plugin!(FromTheFuture, abi_version = 2);
