//! The demo handler: `Hello world.` on `/`, plus the test routes of `demo-routes`.

/// The greeting of this plugin.
#[derive(Debug)]
pub struct Hello;

impl demo_routes::Greeting for Hello {
    const TEXT: &'static str = "Hello world.";
}

gem_plugin::export_plugin!(demo_routes::Demo<Hello>);
