//! The listening sockets of a generation: each configured address gets an inherited
//! socket when one matches, else a freshly bound one.

use std::net::{SocketAddr, TcpListener};

use tracing::info;

use crate::config::ListenAddr;

/// Picks the socket for each configured address: an inherited one with the same label,
/// else one already bound to the same address, else a freshly bound one. Inherited
/// sockets that are no longer configured are closed.
pub(crate) fn open_listeners(
    wanted: &[ListenAddr],
    mut inherited: Vec<(String, TcpListener)>,
) -> Result<Vec<(ListenAddr, TcpListener)>, (ListenAddr, std::io::Error)> {
    let mut out = Vec::with_capacity(wanted.len());
    for addr in wanted {
        let by_label = inherited.iter().position(|(label, _)| *label == addr.spec);
        let by_addr = || {
            inherited
                .iter()
                .position(|(_, l)| l.local_addr().ok() == Some(addr.addr))
        };
        let listener = match by_label.or_else(by_addr) {
            Some(i) => {
                let (label, listener) = inherited.swap_remove(i);
                if label != addr.spec {
                    info!(
                        "[{}] serving {} on the inherited socket {label}",
                        std::process::id(),
                        addr.spec
                    );
                }
                listener
            }
            None => bind(addr.addr).map_err(|e| (addr.clone(), e))?,
        };
        out.push((addr.clone(), listener));
    }
    for (label, _) in inherited {
        info!(
            "[{}] closing inherited listener {label}: no longer configured",
            std::process::id()
        );
    }
    Ok(out)
}

/// Binds a listener with a deep backlog, so bursts queue instead of being refused.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_matched_by_label_then_address_and_extras_closed() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let extra = TcpListener::bind("127.0.0.1:0").unwrap();
        let b_addr = b.local_addr().unwrap();
        let a_addr = a.local_addr().unwrap();
        let wanted = vec![
            ListenAddr::parse("127.0.0.1:0").unwrap(),
            ListenAddr::parse(&b_addr.to_string()).unwrap(),
            ListenAddr::parse("127.0.0.1:0").unwrap(),
        ];
        let inherited = vec![
            ("127.0.0.1:0".to_owned(), a),
            ("whatever".to_owned(), b),
            ("gone".to_owned(), extra),
        ];
        let open = open_listeners(&wanted, inherited).unwrap();
        assert_eq!(open[0].1.local_addr().unwrap(), a_addr, "matched by label");
        assert_eq!(
            open[1].1.local_addr().unwrap(),
            b_addr,
            "matched by address"
        );
        assert_ne!(open[2].1.local_addr().unwrap(), a_addr, "freshly bound");
    }

    #[test]
    fn a_taken_address_names_itself() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = ListenAddr::parse(&taken.local_addr().unwrap().to_string()).unwrap();
        let (failed, err) = open_listeners(std::slice::from_ref(&addr), Vec::new()).unwrap_err();
        assert_eq!(failed, addr);
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
