//! `lb-unix-request SOCKET HEX`: sends the bytes HEX (hex-encoded) to the unix stream socket
//! SOCKET, reads the reply until the server closes (or 5 s pass) and prints one line: `reply
//! HEX` with the reply's bytes, or `connect-failed ERRNO`. The bad-input tests run it as an
//! unprivileged user (`Command::uid`) to see what lbd's control socket answers a raw request.
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, request] = &args[..] else {
        eprintln!("usage: lb-unix-request SOCKET HEX");
        std::process::exit(2);
    };
    let request: Vec<u8> = (0..request.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&request[i..i + 2], 16).expect("hex request"))
        .collect();
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            println!("connect-failed {}", e.raw_os_error().unwrap_or(0));
            return;
        }
    };
    // Never wait for ever on a server that keeps the connection open.
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("setting a read timeout");
    stream.write_all(&request).expect("sending the request");
    let mut reply = vec![];
    // A timeout ends the reply as the server's close does.
    let _ = stream.read_to_end(&mut reply);
    let hex: String = reply.iter().map(|b| format!("{b:02x}")).collect();
    println!("reply {hex}");
}
