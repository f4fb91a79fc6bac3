//! Why an attach, detach, listing or reconnect failed. The messages are what
//! the CLI prints, so each says what was being done and to which device.

pub use crate::remote::handshake::HandshakeError;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("'{0}' is not an NBD device (expected /dev/nbdN)")]
    NotNbdDevice(String),
    #[error("connect {endpoint}: {source}")]
    Connect { endpoint: String, source: io::Error },
    /// Every server of a `--connect` list failed (each one's reason).
    #[error("no server of the list could be used: {0}")]
    NoServer(String),
    #[error("{endpoint}: {source}")]
    Handshake { endpoint: String, source: HandshakeError },
    #[error("export '{0}' does not allow several connections (no CAN_MULTI_CONN)")]
    NoMultiConn(String),
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("netlink family 'nbd': {0} (is the nbd module loaded? modprobe nbd)")]
    NoFamily(io::Error),
    /// A request of the `nbd` family failed (`what` names the command).
    #[error("{what}: {source}")]
    Netlink { what: String, source: io::Error },
    #[error("/dev/nbd{0} is busy (already attached?)")]
    Busy(u32),
    #[error("the kernel did not say which device it used")]
    NoDeviceIndex,
    #[error("no status reply")]
    NoStatusReply,
    #[error("no free /dev/nbdN (modprobe nbd)")]
    NoFreeDevice,
    #[error("the ioctl interface supports one connection only")]
    IoctlOneConnection,
    #[error("{device}: {source}")]
    OpenDevice { device: String, source: io::Error },
    #[error("{device} {what}: {source}")]
    Ioctl { device: String, what: &'static str, source: nix::errno::Errno },
    #[error("no device is attached to volume '{0}'")]
    NotAttached(String),
    #[error("the nbd netlink family has no multicast group (kernel too old for reconnects)")]
    NoMulticastGroup,
    #[error("joining nbd_mc_group: {0}")]
    JoinGroup(io::Error),
    #[error("/dev/nbd{0} now belongs to another backend; not reconnecting")]
    ForeignBackend(u32),
    /// A credential file is missing or unreadable, or names no usable key.
    #[error("TLS credentials: {0}")]
    TlsCredentials(crate::tls::TlsError),
    /// The socket pair or the thread of a TLS relay could not be made.
    #[error("TLS relay: {0}")]
    Relay(io::Error),
}
