//! Addresses on IPv4 and IPv6 alike: listening on both where the host has IPv6, writing
//! `host:port` so an IPv6 host stays readable, and seeing IPv4 peers as IPv4.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::TcpListener;

/// Listens on `addr`. The IPv6 "every address" (`[::]`) takes IPv4 clients too, whatever the
/// host's default (`net.ipv6.bindv6only`), and falls back to IPv4's (`0.0.0.0`) on a host
/// without IPv6.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let any_v6 = addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let listener = match listen(addr) {
        // A kernel without IPv6 (EAFNOSUPPORT: booted with ipv6.disable=1), or one that
        // cannot make a dual-stack socket.
        Err(e) if any_v6 && no_ipv6(&e) => {
            listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())))?
        }
        bound => bound?,
    };
    TcpListener::from_std(listener)
}

/// A listening socket for `addr`, dual-stack when it is IPv6, as tokio makes them otherwise
/// (address reuse, a backlog of 1024, non-blocking).
fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(false)
            .map_err(|_| io::Error::from_raw_os_error(libc::EAFNOSUPPORT))?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL | libc::EPROTONOSUPPORT)
    )
}

/// The address a peer of a dual-stack socket connected from, as it connected: an IPv4 client
/// arrives as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), which stored messages (born
/// host), client ids and logs should show as the IPv4 address it is.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `host:port`, with an IPv6 host in brackets (`[fd00::5]:10911`) as RocketMQ writes it and
/// as socket addresses parse; a host already in brackets, or a name, is kept as given.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The IP address of a configured host (`brokerIP1`), which may be written with or without
/// brackets when it is IPv6.
pub fn parse_ip(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_are_bracketed_once_and_parse_back() {
        assert_eq!(host_port("10.0.0.1", 10911), "10.0.0.1:10911");
        assert_eq!(host_port("fd00::5", 10911), "[fd00::5]:10911");
        assert_eq!(host_port("[fd00::5]", 10911), "[fd00::5]:10911");
        assert_eq!(host_port("broker-0.ns", 10911), "broker-0.ns:10911");
        for host in ["fd00::5", "[fd00::5]", "10.0.0.1"] {
            let ip = parse_ip(host).unwrap();
            let addr: SocketAddr = host_port(host, 1).parse().unwrap();
            assert_eq!(addr.ip(), ip);
        }
        assert_eq!(parse_ip("[10.0.0.1"), None);
    }

    #[test]
    fn ipv4_peers_of_a_dual_stack_socket_are_seen_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:4000".parse().unwrap();
        assert_eq!(canonical(mapped), "10.1.2.3:4000".parse().unwrap());
        let v6: SocketAddr = "[fd00::5]:4000".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[tokio::test]
    async fn one_listener_takes_ipv4_and_ipv6_clients() {
        let l = bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
            .await
            .unwrap();
        if l.local_addr().unwrap().is_ipv6() {
            // Dual-stack whatever net.ipv6.bindv6only says.
            assert!(!socket2::SockRef::from(&l).only_v6().unwrap());
        }
        let port = l.local_addr().unwrap().port();
        let v4 = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (_, from) = l.accept().await.unwrap();
        assert_eq!(canonical(from).ip(), v4.local_addr().unwrap().ip());
        // Where the host has IPv6 (this one's loopback has ::1), IPv6 clients too.
        if l.local_addr().unwrap().is_ipv6() {
            let v6 = tokio::net::TcpStream::connect(("::1", port)).await.unwrap();
            let (_, from) = l.accept().await.unwrap();
            assert_eq!(from.ip(), v6.local_addr().unwrap().ip());
        }
    }
}
