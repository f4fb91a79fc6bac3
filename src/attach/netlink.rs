//! Just enough generic netlink to drive the kernel's `nbd` family
//! (include/uapi/linux/nbd-netlink.h): connect, reconfigure, disconnect,
//! status, and the link-dead multicast notification. Messages are built
//! and parsed by hand; the family has a handful of fixed attribute shapes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_LINK_DEAD: u8 = 4;
pub const NBD_CMD_STATUS: u8 = 5;

pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_ATTR_DEVICE_LIST: u16 = 9;
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
pub const NBD_SOCK_ITEM: u16 = 1;
pub const NBD_SOCK_FD: u16 = 1;
pub const NBD_DEVICE_ITEM: u16 = 1;
pub const NBD_DEVICE_INDEX: u16 = 1;
pub const NBD_DEVICE_CONNECTED: u16 = 2;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

/// Builds one generic netlink message.
pub struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

impl Message {
    pub fn new(family: u16, cmd: u8, flags: u16) -> Message {
        let mut buf = vec![0u8; 20];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf[16] = cmd;
        buf[17] = 1; // genl version
        Message { buf, nests: Vec::new() }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    pub fn u64(&mut self, kind: u16, v: u64) -> &mut Self {
        self.attr(kind, &v.to_ne_bytes())
    }

    pub fn string(&mut self, kind: u16, v: &str) -> &mut Self {
        let mut data = v.as_bytes().to_vec();
        data.push(0);
        self.attr(kind, &data)
    }

    pub fn begin_nest(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nest(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("balanced nests");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    pub fn finish(&mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf.clone()
    }
}

/// One attribute of a received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr<'a> {
    pub kind: u16,
    pub data: &'a [u8],
}

impl Attr<'_> {
    pub fn u32(&self) -> Option<u32> {
        self.data.get(..4).map(|b| u32::from_ne_bytes(b.try_into().expect("len 4")))
    }
    pub fn u16(&self) -> Option<u16> {
        self.data.get(..2).map(|b| u16::from_ne_bytes(b.try_into().expect("len 2")))
    }
    pub fn u8(&self) -> Option<u8> {
        self.data.first().copied()
    }
    pub fn string(&self) -> String {
        String::from_utf8_lossy(self.data.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
    }
}

/// Parses a run of attributes; malformed trailing bytes are ignored.
pub fn attrs(mut data: &[u8]) -> Vec<Attr<'_>> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            break;
        }
        out.push(Attr { kind, data: &data[4..len] });
        data = &data[align4(len).min(data.len())..];
    }
    out
}

/// A received generic netlink message: (netlink type, genl cmd, attrs bytes)
/// or an error/ack (`Err`/`Ok(None)` from `Socket::recv`).
#[derive(Debug, Clone)]
pub struct Received {
    pub kind: u16,
    pub cmd: u8,
    pub payload: Vec<u8>,
}

pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_GENERIC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: addr is a valid sockaddr_nl.
        let r = unsafe { libc::bind(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_nl>() as u32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket { fd, seq: 1 })
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn join_group(&self, group: u32) -> io::Result<()> {
        // SAFETY: setsockopt with a u32 value.
        let r = unsafe {
            libc::setsockopt(self.raw(), libc::SOL_NETLINK, libc::NETLINK_ADD_MEMBERSHIP, &group as *const u32 as *const libc::c_void, 4)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn send(&mut self, msg: &mut Message) -> io::Result<u32> {
        self.seq += 1;
        let bytes = msg.finish(self.seq);
        // SAFETY: sending an initialised buffer.
        let n = unsafe { libc::send(self.raw(), bytes.as_ptr() as *const libc::c_void, bytes.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Receives messages until one is an answer (data or ack/error) to
    /// `seq`, or, with `seq == 0`, any notification.
    pub fn recv(&mut self, seq: u32) -> io::Result<Option<Received>> {
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: receiving into an owned buffer.
            let n = unsafe { libc::recv(self.raw(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut data = &buf[..n as usize];
            while data.len() >= 16 {
                let len = u32::from_ne_bytes(data[..4].try_into().expect("len 4")) as usize;
                let kind = u16::from_ne_bytes([data[4], data[5]]);
                let msg_seq = u32::from_ne_bytes(data[8..12].try_into().expect("len 4"));
                if len < 16 || len > data.len() {
                    break;
                }
                let body = &data[16..len];
                data = &data[align4(len).min(data.len())..];
                if seq != 0 && msg_seq != seq {
                    continue;
                }
                if kind == NLMSG_ERROR {
                    let code = i32::from_ne_bytes(body.get(..4).unwrap_or(&[0; 4]).try_into().expect("len 4"));
                    if code == 0 {
                        return Ok(None);
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                if body.len() >= 4 {
                    return Ok(Some(Received { kind, cmd: body[0], payload: body[4..].to_vec() }));
                }
            }
        }
    }

    /// Sends `msg` and waits for its answer (reply and/or ack).
    pub fn request(&mut self, msg: &mut Message) -> io::Result<Option<Received>> {
        let seq = self.send(msg)?;
        let first = self.recv(seq)?;
        if first.is_some() {
            // An ACK follows the reply when NLM_F_ACK was set; drain it.
            let _ = self.recv_ack_nonblocking(seq);
        }
        Ok(first)
    }

    fn recv_ack_nonblocking(&mut self, seq: u32) -> io::Result<()> {
        let mut pfd = libc::pollfd { fd: self.raw(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid fd.
        if unsafe { libc::poll(&mut pfd, 1, 200) } > 0 {
            let _ = self.recv(seq)?;
        }
        Ok(())
    }
}

/// Resolves a generic netlink family: (id, multicast groups by name).
pub fn resolve_family(sock: &mut Socket, name: &str) -> io::Result<(u16, Vec<(String, u32)>)> {
    let mut msg = Message::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 0);
    msg.string(CTRL_ATTR_FAMILY_NAME, name);
    let reply = sock.request(&mut msg)?.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no reply"))?;
    let mut id = None;
    let mut groups = Vec::new();
    for a in attrs(&reply.payload) {
        match a.kind {
            CTRL_ATTR_FAMILY_ID => id = a.u16(),
            CTRL_ATTR_MCAST_GROUPS => {
                for g in attrs(a.data) {
                    let inner = attrs(g.data);
                    let gname = inner.iter().find(|x| x.kind == CTRL_ATTR_MCAST_GRP_NAME).map(Attr::string);
                    let gid = inner.iter().find(|x| x.kind == CTRL_ATTR_MCAST_GRP_ID).and_then(Attr::u32);
                    if let (Some(n), Some(i)) = (gname, gid) {
                        groups.push((n, i));
                    }
                }
            }
            _ => {}
        }
    }
    let id = id.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("generic netlink family '{name}' not found")))?;
    Ok((id, groups))
}

pub fn ack_flags() -> u16 {
    NLM_F_ACK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_attributes_round_trip() {
        let mut m = Message::new(0x20, NBD_CMD_CONNECT, NLM_F_ACK);
        m.u64(NBD_ATTR_SIZE_BYTES, 1 << 30).begin_nest(NBD_ATTR_SOCKETS).begin_nest(NBD_SOCK_ITEM).u32(NBD_SOCK_FD, 7).end_nest().end_nest();
        m.string(NBD_ATTR_BACKEND_IDENTIFIER, "nbdvirt:v");
        let bytes = m.finish(3);
        assert_eq!(u32::from_ne_bytes(bytes[..4].try_into().unwrap()) as usize, bytes.len());
        assert_eq!(bytes[16], NBD_CMD_CONNECT);
        let a = attrs(&bytes[20..]);
        assert_eq!(a.len(), 3);
        assert_eq!(a[0].kind, NBD_ATTR_SIZE_BYTES);
        assert_eq!(a[1].kind, NBD_ATTR_SOCKETS);
        let item = attrs(a[1].data);
        assert_eq!(item[0].kind, NBD_SOCK_ITEM);
        assert_eq!(attrs(item[0].data)[0].u32(), Some(7));
        assert_eq!(a[2].string(), "nbdvirt:v");
    }
}
