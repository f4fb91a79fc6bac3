//! The kernel's `nbd` generic netlink family
//! (include/uapi/linux/nbd-netlink.h), spoken through `neli`: family and
//! multicast-group resolution, requests (connect, reconfigure, disconnect,
//! status) and the link-dead notification the `--persist` watcher waits for.

use neli::consts::genl::{Cmd, NlAttrType};
use neli::consts::nl::{NlmF, NlmFFlags};
use neli::consts::socket::NlFamily;
use neli::err::NlError;
use neli::genl::{Genlmsghdr, Nlattr};
use neli::nl::{NlPayload, Nlmsghdr};
use neli::socket::NlSocketHandle;
use neli::types::{Buffer, GenlBuffer};
use neli::{neli_enum, Size, ToBytes};
use std::fmt::Debug;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

/// Commands of the `nbd` family (`enum nbd_commands`).
#[neli_enum(serialized_type = "u8")]
pub enum NbdCmd {
    Unspec = 0,
    Connect = 1,
    Disconnect = 2,
    Reconfigure = 3,
    LinkDead = 4,
    Status = 5,
}
impl Cmd for NbdCmd {}

/// Top-level attributes (`NBD_ATTR_*`).
#[neli_enum(serialized_type = "u16")]
pub enum NbdAttr {
    Unspec = 0,
    Index = 1,
    SizeBytes = 2,
    BlockSizeBytes = 3,
    Timeout = 4,
    ServerFlags = 5,
    ClientFlags = 6,
    Sockets = 7,
    DeadConnTimeout = 8,
    DeviceList = 9,
    BackendIdentifier = 10,
}
impl NlAttrType for NbdAttr {}

/// Nested attribute numbers: an item of NBD_ATTR_SOCKETS holds an fd, an
/// item of NBD_ATTR_DEVICE_LIST an index and a connected flag.
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;

/// A message of the `nbd` family, as sent and received.
pub type NbdMessage = Genlmsghdr<NbdCmd, NbdAttr>;

/// The kernel's errno survives (EBUSY means "device in use" to callers);
/// anything else is a library-side failure.
fn io_error<T: Debug, P: Debug>(e: NlError<T, P>) -> io::Error {
    match e {
        NlError::Nlmsgerr(err) => io::Error::from_raw_os_error(-err.error),
        NlError::Wrapped(w) => io::Error::other(w.to_string()),
        other => io::Error::other(other.to_string()),
    }
}

fn ser_error(e: neli::err::SerError) -> io::Error {
    io::Error::other(e.to_string())
}

/// The resolved `nbd` family.
#[derive(Debug, Clone, Copy)]
pub struct NbdFamily {
    pub id: u16,
    /// `nbd_mc_group`, where LINK_DEAD is announced (kernels before 4.12
    /// have none).
    pub group: Option<u32>,
}

/// A generic netlink socket bound to no group.
pub fn open() -> io::Result<NlSocketHandle> {
    NlSocketHandle::connect(NlFamily::Generic, None, &[])
}

/// Resolves the `nbd` family and its multicast group.
pub fn resolve(sock: &mut NlSocketHandle) -> io::Result<NbdFamily> {
    let id = sock.resolve_genl_family("nbd").map_err(io_error)?;
    let group = sock.resolve_nl_mcast_group("nbd", "nbd_mc_group").ok();
    Ok(NbdFamily { id, group })
}

/// A request being built, attribute by attribute.
pub struct NbdRequest {
    cmd: NbdCmd,
    attrs: GenlBuffer<NbdAttr, Buffer>,
}

impl NbdRequest {
    pub fn new(cmd: NbdCmd) -> NbdRequest {
        NbdRequest { cmd, attrs: GenlBuffer::new() }
    }

    /// Adds a u32/u64/string attribute (neli NUL-terminates strings).
    pub fn attr<P: Size + ToBytes>(mut self, kind: NbdAttr, value: P) -> io::Result<NbdRequest> {
        self.attrs.push(Nlattr::new(false, false, kind, value).map_err(ser_error)?);
        Ok(self)
    }

    /// NBD_ATTR_SOCKETS: one nested item per socket, each holding its fd.
    pub fn sockets(mut self, socks: &[OwnedFd]) -> io::Result<NbdRequest> {
        let mut list = Nlattr::new(true, false, NbdAttr::Sockets, Buffer::new()).map_err(ser_error)?;
        for s in socks {
            let mut item = Nlattr::new(true, false, NBD_SOCK_ITEM, Buffer::new()).map_err(ser_error)?;
            item.add_nested_attribute(&Nlattr::new(false, false, NBD_SOCK_FD, s.as_raw_fd() as u32).map_err(ser_error)?)
                .map_err(ser_error)?;
            list.add_nested_attribute(&item).map_err(ser_error)?;
        }
        self.attrs.push(list);
        Ok(self)
    }

    /// Sends the request with NLM_F_ACK and returns its reply, if the
    /// command has one (CONNECT names the device, STATUS lists them); a
    /// kernel error comes back as its errno.
    pub fn send(self, sock: &mut NlSocketHandle, family: &NbdFamily) -> io::Result<Option<NbdMessage>> {
        let flags = NlmFFlags::new(&[NlmF::Request, NlmF::Ack]);
        let msg = Nlmsghdr::new(None, family.id, flags, None, None, NlPayload::Payload(Genlmsghdr::new(self.cmd, 1, self.attrs)));
        sock.send(msg).map_err(ser_error)?;
        let mut reply = None;
        // Iterates the reply (if any) and stops after the ACK.
        for msg in sock.iter::<u16, NbdMessage>(false) {
            if let NlPayload::Payload(p) = msg.map_err(io_error)?.nl_payload {
                reply.get_or_insert(p);
            }
        }
        Ok(reply)
    }
}

/// A u32 attribute of a received message.
pub fn u32_attr(msg: &NbdMessage, kind: NbdAttr) -> Option<u32> {
    msg.get_attr_handle().get_attr_payload_as::<u32>(kind).ok()
}

/// One device of a STATUS reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedDevice {
    pub index: u32,
    pub connected: bool,
}

/// The devices of a STATUS reply (NBD_ATTR_DEVICE_LIST).
pub fn device_list(msg: &NbdMessage) -> Vec<ListedDevice> {
    let mut out = Vec::new();
    let handle = msg.get_attr_handle();
    for list in handle.iter().filter(|a| a.nla_type.nla_type == NbdAttr::DeviceList) {
        let Ok(items) = list.get_attr_handle::<u16>() else { continue };
        for item in items.iter() {
            let Ok(fields) = item.get_attr_handle::<u16>() else { continue };
            let Ok(index) = fields.get_attr_payload_as::<u32>(NBD_DEVICE_INDEX) else { continue };
            let connected = fields.get_attr_payload_as::<u8>(NBD_DEVICE_CONNECTED).unwrap_or(0) != 0;
            out.push(ListedDevice { index, connected });
        }
    }
    out
}

/// A socket joined to `nbd_mc_group`, to hear LINK_DEAD notifications.
pub struct Notifications {
    sock: NlSocketHandle,
}

impl Notifications {
    pub fn join(group: u32) -> io::Result<Notifications> {
        let sock = open()?;
        sock.add_mcast_membership(&[group])?;
        // Non-blocking: `next_dead` drains what arrived after its poll.
        sock.nonblock()?;
        Ok(Notifications { sock })
    }

    /// Waits up to `timeout` for notifications; returns the indexes of the
    /// devices reported dead, or `None` if nothing arrived.
    pub fn wait_dead(&mut self, timeout: Duration) -> io::Result<Option<Vec<u32>>> {
        // SAFETY: the descriptor belongs to `self.sock`, which outlives this
        // borrow; neli's handle has no `AsFd` to borrow it safely.
        let fd = unsafe { BorrowedFd::borrow_raw(self.sock.as_raw_fd()) };
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut dead = Vec::new();
        if nix::poll::poll(&mut fds, ms).map_err(io::Error::from)? == 0 {
            return Ok(None);
        }
        // Drain what is queued (the socket is non-blocking: Ok(None) when
        // empty). Unknown commands and attributes parse (as unrecognised
        // constants), so an error means a broken message: stop there.
        while let Ok(Some(msg)) = self.sock.recv::<u16, NbdMessage>() {
            if let NlPayload::Payload(p) = msg.nl_payload {
                if p.cmd == NbdCmd::LinkDead {
                    dead.extend(u32_attr(&p, NbdAttr::Index));
                }
            }
        }
        Ok(Some(dead))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neli::FromBytesWithInput;
    use std::io::Cursor;

    #[test]
    fn connect_request_nests_sockets_and_round_trips() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let socks = vec![OwnedFd::from(file)];
        let fd = socks[0].as_raw_fd() as u32;
        let req = NbdRequest::new(NbdCmd::Connect)
            .attr(NbdAttr::SizeBytes, 1u64 << 30)
            .unwrap()
            .sockets(&socks)
            .unwrap()
            .attr(NbdAttr::BackendIdentifier, "nbdvirt:v")
            .unwrap();
        let msg = Genlmsghdr::new(req.cmd, 1, req.attrs);
        let mut bytes = Cursor::new(Vec::new());
        msg.to_bytes(&mut bytes).unwrap();
        let len = bytes.get_ref().len();
        let back = NbdMessage::from_bytes_with_input(&mut Cursor::new(bytes.get_ref().as_slice()), len).unwrap();
        assert_eq!(back.cmd, NbdCmd::Connect);
        let handle = back.get_attr_handle();
        assert_eq!(handle.get_attr_payload_as::<u64>(NbdAttr::SizeBytes).unwrap(), 1 << 30);
        let list = handle.get_attribute(NbdAttr::Sockets).unwrap();
        assert!(list.nla_type.nla_nested);
        let items = list.get_attr_handle::<u16>().unwrap();
        let item = items.get_attribute(NBD_SOCK_ITEM).unwrap();
        assert_eq!(item.get_attr_handle::<u16>().unwrap().get_attr_payload_as::<u32>(NBD_SOCK_FD).unwrap(), fd);
        assert_eq!(handle.get_attr_payload_as_with_len::<String>(NbdAttr::BackendIdentifier).unwrap(), "nbdvirt:v");
    }
}
