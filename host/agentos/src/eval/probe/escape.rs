//! Ways out that busybox cannot try: every vsock port of a range, and raw and packet sockets.
//! Each prints what it found, and a line starting `REACHED` for anything that got out, so that
//! a case fails if a port, an interface or a route ever appeared.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::{connect, number};

/// How long the packet socket listens for frames from any interface.
const LISTEN_FOR: Duration = Duration::from_secs(1);
/// Addresses a guest with a network would reach: the usual gateways, a public one, and the
/// cloud metadata service.
const TARGETS: [[u8; 4]; 4] = [
    [10, 0, 2, 2],
    [192, 168, 0, 1],
    [1, 1, 1, 1],
    [169, 254, 169, 254],
];

/// `range CID FIRST LAST STEP`: every STEP-th port from FIRST to LAST (and LAST itself).
pub fn range_command(args: &[String]) -> Result<(), String> {
    let cid = number(args.first(), "CID")?;
    let first = number(args.get(1), "FIRST")?;
    let last = number(args.get(2), "LAST")?;
    let step = number(args.get(3), "STEP")?.max(1);
    if first > last {
        return Err("FIRST must not be above LAST".into());
    }
    let started = Instant::now();
    let (mut tried, mut refused, mut connected) = (0u64, 0u64, 0u64);
    let ports = (u64::from(first)..=u64::from(last))
        .step_by(step as usize)
        .chain(std::iter::once(u64::from(last)));
    let mut previous = None;
    for port in ports {
        if previous == Some(port) {
            continue;
        }
        previous = Some(port);
        let port = port as u32;
        tried += 1;
        match connect(cid, port) {
            Ok(_) => {
                connected += 1;
                println!("cid {cid} port {port}: connected");
            }
            Err(_) => refused += 1,
        }
    }
    println!(
        "cid {cid} ports {first}..={last} step {step}: {tried} tried, {refused} refused, {connected} connected in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn socket(
    domain: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
) -> Result<OwnedFd, String> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The guest's interfaces, by index and name.
fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns a list ending with a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return out;
    }
    let mut entry = list;
    // SAFETY: entries are valid up to the terminating one with index 0; names are C strings.
    unsafe {
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*entry).if_index, name));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// A datagram to `addr`:`port` on a socket of `kind`; how it went.
fn send_to(fd: &OwnedFd, addr: [u8; 4], port: u16, payload: &[u8]) -> Result<(), String> {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid buffer and a sockaddr_in of the size given.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            payload.as_ptr().cast(),
            payload.len(),
            0,
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// `sockets`: raw and packet sockets, as root in the guest may open them.
pub fn sockets_command() -> Result<(), String> {
    let found = interfaces();
    let names: Vec<&str> = found.iter().map(|(_, n)| n.as_str()).collect();
    println!("interfaces: {}", names.join(" "));
    for (_, name) in found.iter().filter(|(_, n)| n != "lo") {
        println!("REACHED: interface {name}");
    }
    // An ICMP echo request, by hand, on a raw socket.
    let echo = [8u8, 0, 0xf7, 0xff, 0, 0, 0, 0];
    match socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) {
        Ok(raw) => {
            for target in TARGETS {
                let shown = target.map(|b| b.to_string()).join(".");
                match send_to(&raw, target, 0, &echo) {
                    Ok(()) => println!("REACHED: raw icmp sent to {shown}"),
                    Err(e) => println!("raw icmp to {shown}: refused ({e})"),
                }
            }
        }
        Err(e) => println!("raw socket: cannot open ({e})"),
    }
    // DHCP's broadcast, the first thing a guest with a network interface would send.
    match socket(libc::AF_INET, libc::SOCK_DGRAM, 0) {
        Ok(udp) => {
            let one: libc::c_int = 1;
            // SAFETY: SO_BROADCAST with a valid int.
            unsafe {
                libc::setsockopt(
                    udp.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_BROADCAST,
                    (&raw const one).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            match send_to(&udp, [255, 255, 255, 255], 67, b"discover") {
                Ok(()) => println!("REACHED: a broadcast left the guest"),
                Err(e) => println!("udp broadcast: refused ({e})"),
            }
        }
        Err(e) => println!("udp socket: cannot open ({e})"),
    }
    // Every frame any interface sees, for a while: only loopback may have any.
    let packet = socket(
        libc::AF_PACKET,
        libc::SOCK_RAW | libc::SOCK_NONBLOCK,
        i32::from((libc::ETH_P_ALL as u16).to_be()),
    )?;
    let until = Instant::now() + LISTEN_FOR;
    let mut frames = 0u64;
    let mut buf = [0u8; 2048];
    while Instant::now() < until {
        // SAFETY: sockaddr_ll is plain data, filled by recvfrom.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: a valid buffer and address of the sizes given.
        let n = unsafe {
            libc::recvfrom(
                packet.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &mut len,
            )
        };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        frames += 1;
        let index = from.sll_ifindex as u32;
        let name = found
            .iter()
            .find(|(i, _)| *i == index)
            .map_or("?", |(_, n)| n.as_str());
        if name != "lo" {
            println!("REACHED: a frame on interface {name} ({index})");
        }
    }
    println!(
        "packet socket: {frames} frames in {} s, all on lo",
        LISTEN_FOR.as_secs()
    );
    println!("sockets checked");
    Ok(())
}
