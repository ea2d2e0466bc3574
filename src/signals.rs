//! Which Unix signal does what: the `Signal` and `Action` types and the validated
//! `SignalRegistry` the lifecycle loop matches on.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use futures_util::{Stream, StreamExt};

/// A Unix signal that gem knows by name.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Signal(i32);

/// (number, short name, description as the Go original logs it).
const KNOWN: &[(i32, &str, &str)] = &[
    (libc_sig::SIGHUP, "HUP", "hangup"),
    (libc_sig::SIGINT, "INT", "interrupt"),
    (libc_sig::SIGQUIT, "QUIT", "quit"),
    (libc_sig::SIGILL, "ILL", "illegal instruction"),
    (libc_sig::SIGTRAP, "TRAP", "trace/breakpoint trap"),
    (libc_sig::SIGABRT, "ABRT", "aborted"),
    (libc_sig::SIGBUS, "BUS", "bus error"),
    (libc_sig::SIGFPE, "FPE", "floating point exception"),
    (libc_sig::SIGKILL, "KILL", "killed"),
    (libc_sig::SIGUSR1, "USR1", "user defined signal 1"),
    (libc_sig::SIGSEGV, "SEGV", "segmentation fault"),
    (libc_sig::SIGUSR2, "USR2", "user defined signal 2"),
    (libc_sig::SIGPIPE, "PIPE", "broken pipe"),
    (libc_sig::SIGALRM, "ALRM", "alarm clock"),
    (libc_sig::SIGTERM, "TERM", "terminated"),
    (libc_sig::SIGCHLD, "CHLD", "child exited"),
    (libc_sig::SIGCONT, "CONT", "continued"),
    (libc_sig::SIGSTOP, "STOP", "stopped (signal)"),
    (libc_sig::SIGTSTP, "TSTP", "stopped"),
    (libc_sig::SIGTTIN, "TTIN", "stopped (tty input)"),
    (libc_sig::SIGTTOU, "TTOU", "stopped (tty output)"),
    (libc_sig::SIGURG, "URG", "urgent I/O condition"),
    (libc_sig::SIGXCPU, "XCPU", "CPU time limit exceeded"),
    (libc_sig::SIGXFSZ, "XFSZ", "file size limit exceeded"),
    (libc_sig::SIGVTALRM, "VTALRM", "virtual timer expired"),
    (libc_sig::SIGPROF, "PROF", "profiling timer expired"),
    (libc_sig::SIGWINCH, "WINCH", "window changed"),
    (libc_sig::SIGIO, "IO", "I/O possible"),
    (libc_sig::SIGSYS, "SYS", "bad system call"),
];

/// Signals no table may map: uncatchable, crash signals (their default core dump is the
/// useful behaviour), and ones the runtime itself depends on.
const UNMAPPABLE: &[i32] = &[
    libc_sig::SIGKILL,
    libc_sig::SIGSTOP,
    libc_sig::SIGSEGV,
    libc_sig::SIGBUS,
    libc_sig::SIGILL,
    libc_sig::SIGFPE,
    libc_sig::SIGABRT,
    libc_sig::SIGTRAP,
    libc_sig::SIGSYS,
    libc_sig::SIGCHLD,
    libc_sig::SIGPIPE,
];

/// Signal numbers, from signal-hook's re-export of libc.
mod libc_sig {
    pub use signal_hook::consts::signal::*;
}

impl Signal {
    /// Hangup: restart by default.
    pub const HUP: Signal = Signal(libc_sig::SIGHUP);
    /// Interrupt (Ctrl-C): shutdown by default.
    pub const INT: Signal = Signal(libc_sig::SIGINT);
    /// Quit: not mapped by default, so it keeps its core dump.
    pub const QUIT: Signal = Signal(libc_sig::SIGQUIT);
    /// Terminate: always shutdown.
    pub const TERM: Signal = Signal(libc_sig::SIGTERM);
    /// User signal 1: ignored by default.
    pub const USR1: Signal = Signal(libc_sig::SIGUSR1);
    /// User signal 2: ignored by default.
    pub const USR2: Signal = Signal(libc_sig::SIGUSR2);
    /// Kill: can never be mapped.
    pub const KILL: Signal = Signal(libc_sig::SIGKILL);

    /// The signal with number `signo`, if gem knows it.
    pub fn from_number(signo: i32) -> Option<Signal> {
        KNOWN.iter().find(|k| k.0 == signo).map(|k| Signal(k.0))
    }

    /// The signal number.
    pub fn number(self) -> i32 {
        self.0
    }

    fn entry(self) -> &'static (i32, &'static str, &'static str) {
        // Every `Signal` is built from `KNOWN`, so the lookup cannot miss.
        KNOWN
            .iter()
            .find(|k| k.0 == self.0)
            .unwrap_or(&(0, "?", "unknown signal"))
    }

    /// The canonical name, e.g. `SIGHUP`.
    pub fn name(self) -> String {
        format!("SIG{}", self.entry().1)
    }

    /// The short name used as the `[signals]` key, e.g. `HUP`.
    pub fn short_name(self) -> &'static str {
        self.entry().1
    }

    /// How the Go original logs it: `hangup`, `terminated`, ...
    pub fn description(self) -> &'static str {
        self.entry().2
    }

    /// Whether a `[signals]` table may map this signal at all.
    pub fn is_mappable(self) -> bool {
        !UNMAPPABLE.contains(&self.0)
    }
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIG{}", self.short_name())
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIG{}", self.short_name())
    }
}

impl FromStr for Signal {
    type Err = SignalError;

    /// Accepts `SIGHUP`, `HUP` and `hup`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.trim().to_ascii_uppercase();
        let short = upper.strip_prefix("SIG").unwrap_or(&upper);
        KNOWN
            .iter()
            .find(|k| k.1 == short)
            .map(|k| Signal(k.0))
            .ok_or_else(|| SignalError::UnknownSignal {
                name: s.to_owned(),
                valid: valid_signal_names(),
            })
    }
}

fn valid_signal_names() -> String {
    KNOWN
        .iter()
        .filter(|k| !UNMAPPABLE.contains(&k.0))
        .map(|k| k.1)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a signal makes gem do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Hand the sockets to a freshly started process, then drain this one.
    Restart,
    /// Drain in-flight requests, then exit 0.
    Shutdown,
    /// Log the signal and carry on.
    Ignore,
    /// Call the handler plugin's `on_signal` hook.
    Plugin,
    /// Reopen the access log file (after logrotate moved it).
    Reopen,
}

impl Action {
    const ALL: &'static str = "restart, shutdown, ignore, plugin, reopen";
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Restart => "restart",
            Action::Shutdown => "shutdown",
            Action::Ignore => "ignore",
            Action::Plugin => "plugin",
            Action::Reopen => "reopen",
        })
    }
}

impl FromStr for Action {
    type Err = SignalError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "restart" => Ok(Action::Restart),
            "shutdown" => Ok(Action::Shutdown),
            "ignore" => Ok(Action::Ignore),
            "plugin" => Ok(Action::Plugin),
            "reopen" => Ok(Action::Reopen),
            _ => Err(SignalError::UnknownAction {
                action: s.to_owned(),
                valid: Action::ALL,
            }),
        }
    }
}

/// A rule of the signal table was broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    /// Not a signal name gem knows.
    #[error("unknown signal {name:?}; valid signals are {valid}")]
    UnknownSignal {
        /// What was written.
        name: String,
        /// The names that are accepted.
        valid: String,
    },
    /// Not one of the four actions.
    #[error("unknown action {action:?}; valid actions are {valid}")]
    UnknownAction {
        /// What was written.
        action: String,
        /// The actions that are accepted.
        valid: &'static str,
    },
    /// SIGTERM was given an action other than shutdown.
    #[error("SIGTERM is always \"shutdown\" and cannot be mapped to \"{0}\"")]
    TermIsShutdown(Action),
    /// An uncatchable, crash or runtime signal.
    #[error("{0} cannot be mapped: it is uncatchable or must keep its default behaviour")]
    Unmappable(Signal),
    /// Two spellings of the same signal in one table.
    #[error("{0} is mapped more than once")]
    Duplicate(Signal),
}

/// The validated signal table: every entry obeys the fixed rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalRegistry {
    map: BTreeMap<Signal, Action>,
}

impl Default for SignalRegistry {
    /// HUP restart, TERM shutdown, INT shutdown, USR1 ignore, USR2 ignore.
    fn default() -> Self {
        let map = [
            (Signal::HUP, Action::Restart),
            (Signal::TERM, Action::Shutdown),
            (Signal::INT, Action::Shutdown),
            (Signal::USR1, Action::Ignore),
            (Signal::USR2, Action::Ignore),
        ]
        .into_iter()
        .collect();
        SignalRegistry { map }
    }
}

impl SignalRegistry {
    /// Maps `sig` to `action`, enforcing the fixed rules.
    pub fn set(&mut self, sig: Signal, action: Action) -> Result<(), SignalError> {
        if !sig.is_mappable() {
            return Err(SignalError::Unmappable(sig));
        }
        if sig == Signal::TERM && action != Action::Shutdown {
            return Err(SignalError::TermIsShutdown(action));
        }
        self.map.insert(sig, action);
        Ok(())
    }

    /// The defaults overlaid with a `[signals]` table as written by the user.
    /// On error, returns the offending key with the error.
    pub fn from_table<'a>(
        table: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, (String, SignalError)> {
        let mut registry = SignalRegistry::default();
        let mut seen = Vec::new();
        for (key, value) in table {
            let fail = |e| (key.to_owned(), e);
            let sig: Signal = key.parse().map_err(fail)?;
            let action: Action = value.parse().map_err(fail)?;
            if seen.contains(&sig) {
                return Err(fail(SignalError::Duplicate(sig)));
            }
            seen.push(sig);
            registry.set(sig, action).map_err(fail)?;
        }
        Ok(registry)
    }

    /// The action for `sig`, if it is mapped.
    pub fn action(&self, sig: Signal) -> Option<Action> {
        self.map.get(&sig).copied()
    }

    /// Every mapped signal and its action, in signal-number order.
    pub fn iter(&self) -> impl Iterator<Item = (Signal, Action)> + '_ {
        self.map.iter().map(|(s, a)| (*s, *a))
    }
}

/// Real Unix signals for every signal in `registry`, as a stream. Installing a handler
/// for each mapped signal, `ignore` included, is what keeps it from its default action.
pub(crate) fn os_signals(
    registry: &SignalRegistry,
) -> std::io::Result<impl Stream<Item = Signal> + Unpin + use<>> {
    let numbers: Vec<i32> = registry.iter().map(|(s, _)| s.number()).collect();
    let signals = signal_hook_tokio::Signals::new(numbers)?;
    Ok(signals.filter_map(|n| std::future::ready(Signal::from_number(n))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, &str)]) -> Result<SignalRegistry, (String, SignalError)> {
        SignalRegistry::from_table(entries.iter().copied())
    }

    #[test]
    fn every_spelling_parses_to_the_same_signal() {
        for s in ["SIGHUP", "HUP", "hup", "SigHup", " sighup "] {
            assert_eq!(s.parse::<Signal>(), Ok(Signal::HUP), "{s}");
        }
        assert_eq!("usr2".parse::<Signal>(), Ok(Signal::USR2));
        assert_eq!("SIGWINCH".parse::<Signal>().map(Signal::number), Ok(28));
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let err = "SIGFOO".parse::<Signal>().unwrap_err().to_string();
        assert!(err.contains("\"SIGFOO\""), "{err}");
        assert!(err.contains("HUP, INT, QUIT"), "{err}");
        assert!(
            !err.contains("KILL"),
            "unmappable names are not offered: {err}"
        );
        let err = "reboot".parse::<Action>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown action \"reboot\"; valid actions are restart, shutdown, ignore, plugin, reopen"
        );
    }

    #[test]
    fn defaults_match_the_design() {
        let r = SignalRegistry::default();
        assert_eq!(r.action(Signal::HUP), Some(Action::Restart));
        assert_eq!(r.action(Signal::TERM), Some(Action::Shutdown));
        assert_eq!(r.action(Signal::INT), Some(Action::Shutdown));
        assert_eq!(r.action(Signal::USR1), Some(Action::Ignore));
        assert_eq!(r.action(Signal::USR2), Some(Action::Ignore));
        assert_eq!(r.action(Signal::QUIT), None, "QUIT keeps its core dump");
        assert_eq!(r.iter().count(), 5);
    }

    #[test]
    fn term_is_always_shutdown() {
        let (key, err) = table(&[("TERM", "restart")]).unwrap_err();
        assert_eq!(key, "TERM");
        assert_eq!(err, SignalError::TermIsShutdown(Action::Restart));
        assert!(err.to_string().contains("SIGTERM is always \"shutdown\""));
        assert!(table(&[("sigterm", "shutdown")]).is_ok());
    }

    #[test]
    fn forbidden_signals_are_refused_by_name() {
        for name in [
            "KILL", "STOP", "SEGV", "BUS", "ILL", "FPE", "ABRT", "TRAP", "SYS", "CHLD", "PIPE",
        ] {
            let (key, err) = table(&[(name, "ignore")]).unwrap_err();
            assert_eq!(key, name);
            assert!(matches!(err, SignalError::Unmappable(_)), "{name}: {err}");
            assert!(
                err.to_string()
                    .contains(&format!("SIG{name} cannot be mapped")),
                "{err}"
            );
        }
    }

    #[test]
    fn user_entries_override_defaults_and_add_new_ones() {
        let r = table(&[
            ("usr2", "shutdown"),
            ("SIGINT", "ignore"),
            ("WINCH", "plugin"),
        ])
        .unwrap();
        assert_eq!(r.action(Signal::USR2), Some(Action::Shutdown));
        assert_eq!(r.action(Signal::INT), Some(Action::Ignore));
        assert_eq!(r.action(Signal::HUP), Some(Action::Restart));
        assert_eq!(r.action("WINCH".parse().unwrap()), Some(Action::Plugin));
    }

    #[test]
    fn two_spellings_of_one_signal_are_an_error() {
        let (key, err) = table(&[("HUP", "restart"), ("sighup", "ignore")]).unwrap_err();
        assert_eq!(key, "sighup");
        assert_eq!(err, SignalError::Duplicate(Signal::HUP));
    }

    #[test]
    fn bad_action_names_the_key() {
        let (key, err) = table(&[("USR1", "explode")]).unwrap_err();
        assert_eq!(key, "USR1");
        assert!(matches!(err, SignalError::UnknownAction { .. }));
    }

    #[test]
    fn descriptions_match_the_go_log_lines() {
        assert_eq!(Signal::HUP.description(), "hangup");
        assert_eq!(Signal::TERM.description(), "terminated");
        assert_eq!(Signal::HUP.name(), "SIGHUP");
    }
}
