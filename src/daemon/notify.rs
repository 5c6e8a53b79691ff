//! Notifications to systemd (READY, STATUS, WATCHDOG, STOPPING) that never block the
//! daemon's one thread.

use std::io;
use std::time::Duration;

use log::warn;
use sd_notify::NotifyState;

/// How long a notification may wait for room in the manager's queue.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// Tell systemd (`$NOTIFY_SOCKET`). Not `sd_notify::notify`: its send blocks while the
/// manager's queue is full (a busy or stuck manager, a test that does not read), which
/// would stop this single-threaded daemon, watchdog and all. Here a notification that
/// finds no room within [`NOTIFY_TIMEOUT`] is dropped and said so.
pub fn notify(states: &[NotifyState]) {
    // Outside systemd (no NOTIFY_SOCKET) there is no one to tell.
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    if let Err(e) = send_notification(&path, &msg, NOTIFY_TIMEOUT) {
        warn!(
            "sd_notify: {} not delivered: {e}",
            msg.trim_end().replace('\n', " ")
        );
    }
}

/// One datagram to the socket at `path` (`@name`: abstract), waiting at most `timeout`
/// for room in its queue.
fn send_notification(path: &std::ffi::OsStr, msg: &str, timeout: Duration) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let sock = UnixDatagram::unbound()?;
    sock.set_write_timeout(Some(timeout))?;
    let addr = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    sock.send_to_addr(msg.as_bytes(), &addr).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manager_that_does_not_read_does_not_stop_the_daemon() {
        let dir = crate::files::test_dir("notify");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let manager = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let t = Duration::from_millis(20);
        // The queue fills (net.unix.max_dgram_qlen, 10 by default); then sends time out
        // instead of blocking for good.
        let results: Vec<bool> = (0..40)
            .map(|_| send_notification(path.as_os_str(), "STATUS=x\n", t).is_ok())
            .collect();
        assert!(results[0], "the first notification is delivered");
        assert!(
            results.iter().any(|ok| !ok),
            "a full queue must fail the send"
        );
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=x\n");
        assert!(
            send_notification(path.as_os_str(), "READY=1\n", t).is_ok(),
            "room again"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
