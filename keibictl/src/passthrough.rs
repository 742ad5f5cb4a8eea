//! `keibictl debug passthrough`: whether a mount's reads and writes really
//! go through FUSE passthrough.
//!
//! keibi-mountd falls back to doing reads and writes itself when the kernel
//! does not grant passthrough or refuses to register a content file, and
//! says so only once in its log. This asks the mount's mountd directly, on
//! its ops socket (`MountDebug::passthrough`), for what it asked for, what
//! the kernel granted, and how many opens went each way since the mount.
//! The socket is found as for `debug ops` ([`ipc_schema::paths`]).

use ipc_schema::PassthroughStatus;
use ipc_schema::transport::{connect_mount_debug, context_with_timeout};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tarpc::client::RpcError;

/// The ops socket to ask: the one named, or the mountpoint's under
/// `lock_dir` (the mountpoint is made absolute without touching it).
pub fn socket(mount: Option<&Path>, named: Option<&Path>, lock_dir: &Path) -> PathBuf {
    match (named, mount) {
        (Some(s), _) => s.to_path_buf(),
        (None, Some(m)) => {
            let abs = std::path::absolute(m).unwrap_or_else(|_| m.to_path_buf());
            ipc_schema::paths::mount_anchor(lock_dir, &abs).join(ipc_schema::paths::OPS_SOCKET)
        }
        // clap requires one of the two.
        (None, None) => lock_dir.join(ipc_schema::paths::OPS_SOCKET),
    }
}

/// Ask the mountd on `sock`, bounded by `timeout` as a whole.
pub async fn ask(sock: &Path, timeout: Duration) -> Result<PassthroughStatus, String> {
    let no_answer = || {
        format!(
            "keibi-mountd did not answer on {} within {} (ETIMEDOUT)",
            sock.display(),
            humantime::format_duration(timeout)
        )
    };
    let exchange = async {
        let client = connect_mount_debug(sock)
            .await
            .map_err(|e| format!("{}: {e}", sock.display()))?;
        client
            .passthrough(context_with_timeout(timeout))
            .await
            .map_err(|e| match e {
                RpcError::DeadlineExceeded => no_answer(),
                other => format!("{}: request failed: {other}", sock.display()),
            })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(no_answer()),
    }
}

/// In use: asked for, granted, and not switched off.
fn in_use(s: &PassthroughStatus) -> bool {
    s.wanted && s.granted && !s.disabled
}

/// The answer for people.
pub fn table(s: &PassthroughStatus) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    format!(
        "passthrough in use:  {}\n\
         asked for:           {}\n\
         granted by kernel:   {}\n\
         switched off:        {}\n\
         passthrough opens:   {}\n\
         plain opens:         {}\n",
        yes_no(in_use(s)),
        yes_no(s.wanted),
        yes_no(s.granted),
        yes_no(s.disabled),
        s.passthrough_opens,
        s.plain_opens
    )
}

/// The answer as one JSON object: the fields of [`PassthroughStatus`] and
/// `in_use`.
pub fn json(s: &PassthroughStatus) -> Result<String, String> {
    crate::output::to_json(&crate::output::PassthroughOutput {
        status: *s,
        in_use: in_use(s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_every_field_and_in_use() {
        let s = PassthroughStatus {
            wanted: true,
            granted: true,
            disabled: false,
            passthrough_opens: 3,
            plain_opens: 0,
        };
        let v: serde_json::Value = serde_json::from_str(&json(&s).expect("json")).expect("parse");
        assert_eq!(v["in_use"], true);
        assert_eq!(v["passthrough_opens"], 3);
        assert_eq!(v["plain_opens"], 0);
        assert!(table(&s).contains("passthrough in use:  yes"));
    }

    #[test]
    fn socket_of_a_mount_is_under_the_lock_dir() {
        let s = socket(
            Some(Path::new("/mnt/a")),
            None,
            Path::new("/run/keibi/mounts"),
        );
        assert!(s.starts_with("/run/keibi/mounts"));
        assert!(s.ends_with(ipc_schema::paths::OPS_SOCKET));
        let n = socket(None, Some(Path::new("/x.sock")), Path::new("/l"));
        assert_eq!(n, PathBuf::from("/x.sock"));
    }
}
