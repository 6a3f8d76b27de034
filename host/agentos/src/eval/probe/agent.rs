//! `probe agent PORT MODE`: a guest agent that lies. It dials the host like the real one, says a
//! proper hello, and answers the host's first request (an exec or an inference) with what a
//! hostile guest would send, so that the host's request loops, not only its handshake, meet
//! it: malformed and oversized frames, frames for requests never made, output after the end, a
//! frame trickled a byte at a time, or output without end.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use agentos_protocol::{
    BootTimings, ExitStatus, FrameReader, GuestMessage, Hello, HostMessage, PROTOCOL_VERSION,
    StreamData, encode_frame,
};

use super::{ANSWER_WAIT, HOST_CID, connect, number};

/// One output chunk of the flood, as the real agent sends them.
const FLOOD_CHUNK_BYTES: usize = 32 * 1024;
/// Pause between the bytes of a trickled frame.
const TRICKLE_PAUSE: Duration = Duration::from_millis(50);

/// The bytes to send once the host's request (of id `id`) arrived, for each malformed reply.
fn malformed_replies(id: u64) -> Vec<(&'static str, Vec<u8>)> {
    let frame = |msg: &GuestMessage| encode_frame(msg).unwrap_or_default();
    let raw = |body: &[u8]| {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    };
    let exited = |id| GuestMessage::Exited {
        id,
        status: ExitStatus {
            code: Some(0),
            ..ExitStatus::default()
        },
    };
    let mut after_end = frame(&exited(id + 1000));
    after_end.extend(frame(&GuestMessage::Stdout {
        id: id + 1000,
        data: StreamData(b"late".to_vec()),
    }));
    vec![
        ("length-4GiB", u32::MAX.to_be_bytes().to_vec()),
        ("oversized-2MiB", {
            let mut f = (2u32 << 20).to_be_bytes().to_vec();
            f.extend(std::iter::repeat_n(b' ', 64 * 1024));
            f
        }),
        ("not-json", raw(b"{{{ not json")),
        ("unknown-type", raw(br#"{"type":"root_shell","id":1}"#)),
        (
            "bad-base64",
            raw(format!(r#"{{"type":"stdout","id":{id},"data":"!!"}}"#).as_bytes()),
        ),
        ("truncated", {
            let mut f = 200u32.to_be_bytes().to_vec();
            f.extend_from_slice(br#"{"type":"exited","#);
            f
        }),
        ("other-ids-only", {
            let mut f = frame(&GuestMessage::Stdout {
                id: id + 7,
                data: StreamData(b"not yours".to_vec()),
            });
            f.extend(after_end);
            f
        }),
        ("second-hello", frame(&hello())),
    ]
}

fn hello() -> GuestMessage {
    GuestMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        agent: "agentos-eval-probe (lying agent)".into(),
        kernel: "unknown".into(),
        vcpus: 1,
        memory_kib: 0,
        boot: BootTimings::default(),
    })
}

/// Connects to the host as an agent would and waits for its first request; returns the stream
/// and the request's id.
fn become_agent(port: u32) -> Result<(std::os::unix::net::UnixStream, u64), String> {
    let mut stream = connect(HOST_CID, port).map_err(|e| format!("cannot connect: {e}"))?;
    stream
        .write_all(&encode_frame(&hello()).map_err(|e| e.to_string())?)
        .map_err(|e| format!("cannot say hello: {e}"))?;
    stream
        .set_read_timeout(Some(ANSWER_WAIT))
        .map_err(|e| e.to_string())?;
    let mut frames = FrameReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let request = frames
        .read::<HostMessage>()
        .map_err(|e| format!("no request from the host: {e}"))?
        .ok_or("the host closed the connection after the hello")?;
    Ok((stream, request.id()))
}

/// How the host ended a connection: closed it, or left it open past our wait.
fn ending(stream: &mut std::os::unix::net::UnixStream) -> String {
    let _ = stream.set_read_timeout(Some(ANSWER_WAIT));
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return "closed by the host".into(),
            // The host may still send frames (a ping); keep reading until it closes.
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return format!("still open after {} s", ANSWER_WAIT.as_secs());
            }
            Err(e) => return format!("ended: {e}"),
        }
    }
}

pub fn agent_command(args: &[String]) -> Result<(), String> {
    let port = number(args.first(), "PORT")?;
    match args.get(1).map(String::as_str) {
        Some("malformed") => {
            for index in 0..malformed_replies(0).len() {
                let (mut stream, id) = become_agent(port)?;
                let (what, bytes) = malformed_replies(id).swap_remove(index);
                let written = stream.write_all(&bytes);
                let written = if written.is_ok() {
                    "written"
                } else {
                    "write failed"
                };
                println!("agent reply {what}: {written}; {}", ending(&mut stream));
            }
            trickle(port)
        }
        Some("flood") => flood(port, number(args.get(2), "SECONDS")?),
        _ => Err("agent needs a mode: malformed, or flood SECONDS".into()),
    }
}

/// An answer sent a byte at a time: the host must give up at its deadline, not wait for the
/// frame's end.
fn trickle(port: u32) -> Result<(), String> {
    let (mut stream, id) = become_agent(port)?;
    let started = Instant::now();
    let frame = encode_frame(&GuestMessage::Stdout {
        id,
        data: StreamData(vec![b'x'; 48 * 1024]),
    })
    .map_err(|e| e.to_string())?;
    let mut sent = 0;
    for byte in frame {
        if stream.write_all(&[byte]).is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(TRICKLE_PAUSE);
    }
    println!(
        "agent reply trickled: {sent} bytes in {:.1} s before the host closed",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Output for the host's request as fast as the host takes it, never ending it: the host keeps
/// what it keeps and gives up at its deadline.
fn flood(port: u32, secs: u32) -> Result<(), String> {
    let (mut stream, id) = become_agent(port)?;
    let frame = encode_frame(&GuestMessage::Stdout {
        id,
        data: StreamData(vec![0xa5; FLOOD_CHUNK_BYTES]),
    })
    .map_err(|e| e.to_string())?;
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let end = Instant::now() + Duration::from_secs(u64::from(secs));
    let mut bytes = 0u64;
    let mut why = "time up".to_string();
    while Instant::now() < end {
        match stream.write_all(&frame) {
            Ok(()) => bytes += FLOOD_CHUNK_BYTES as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                why = format!("the host closed it ({e})");
                break;
            }
        }
    }
    println!("agent flood: {bytes} bytes of output, then {why}");
    Ok(())
}
