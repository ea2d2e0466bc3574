//! The handler a restart upgrades to: `Congratulation! Server has been upgraded.` on
//! `/`, plus the test routes of `demo-routes`.

/// The greeting of this plugin.
#[derive(Debug)]
pub struct Upgraded;

impl demo_routes::Greeting for Upgraded {
    const TEXT: &'static str = "Congratulation! Server has been upgraded.";
}

gem_plugin::export_plugin!(demo_routes::Demo<Upgraded>);
