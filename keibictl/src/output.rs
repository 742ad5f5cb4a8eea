//! What `--json` prints, as types, and their JSON Schemas.
//!
//! Every command's JSON is serde's form of one type: a protocol type of
//! `ipc_schema` as is (`status --files`: `Vec<NotLocal>`, `check`:
//! `CheckReport`, ...) or one of the small wrappers here, which add what
//! keibictl itself knows (the `sync` key of `status`, `in_use` of `debug
//! passthrough`, the outcome of `wait` and `prefetch`). [`schemas`] derives
//! a JSON Schema (draft 2020-12, with `schemars`) of each, with
//! `additionalProperties: false` on every object, so a field that is not
//! documented fails validation. They are checked in under
//! `docs/json-schema/<command>.json`; a unit test fails when a file is
//! stale (`KEIBI_BLESS_SCHEMAS=1 cargo test -p keibictl schema` rewrites
//! them), and the end-to-end test `tests/tests/cli_json.rs` validates
//! every command's real output against them.

use ipc_schema::{
    BenchReport, CheckReport, FetchInFlight, NotLocal, OpInFlight, PassthroughStatus, PeerIdentity,
    PeerInfo, PeerOpInFlight, PrefetchFile, Status, SyncStatus,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `keibictl status --json`: the protocol's `Status` with its
/// `SyncStatus` under `sync`.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
pub struct StatusOutput {
    /// syncd's status (its fields at the top level).
    #[serde(flatten)]
    pub status: Status,
    /// The sync state.
    pub sync: SyncStatus,
}

/// `keibictl debug ops --json`: each source's operations in flight,
/// `null` for a source that did not answer.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
pub struct DebugOpsOutput {
    /// keibi-syncd's filesystem requests in flight.
    pub syncd: Option<Vec<OpInFlight>>,
    /// keibi-syncd's peer requests in flight.
    pub peers: Option<Vec<PeerOpInFlight>>,
    /// keibi-syncd's chunk fetches in flight.
    pub fetches: Option<Vec<FetchInFlight>>,
    /// Each mount asked (its mountpoint, or the socket named): its FUSE
    /// operations in flight.
    pub mounts: BTreeMap<String, Option<Vec<OpInFlight>>>,
}

/// `keibictl debug passthrough --json`.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
pub struct PassthroughOutput {
    /// What mountd said (its fields at the top level).
    #[serde(flatten)]
    pub status: PassthroughStatus,
    /// Passthrough is in use: asked for, granted and not switched off.
    pub in_use: bool,
}

/// `keibictl wait --json`: printed when the wait ends, done or not.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
pub struct WaitOutput {
    /// What was waited for: `answer` (syncd answers) or `synced`.
    pub until: String,
    /// Whether it happened before the timeout (exit status 0; else 4).
    pub done: bool,
    /// Milliseconds waited.
    pub waited_ms: u64,
    /// What is still pending when not done, for people.
    pub pending: Option<String>,
    /// Fingerprints of the paired peers that were not connected at the
    /// last look, and so not waited for.
    pub not_waited_for: Vec<String>,
    /// The last sync state read (`--synced` only; `null` if syncd never
    /// answered).
    pub sync: Option<SyncStatus>,
}

/// `keibictl prefetch --json`: printed when the command ends.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
pub struct PrefetchOutput {
    /// Whether every file that could be fetched is local (a file with an
    /// `error` is not, and makes the exit status 1).
    pub done: bool,
    /// Milliseconds waited.
    pub waited_ms: u64,
    /// Each path as last seen (`present_bytes == size` when local).
    pub files: Vec<PrefetchFile>,
}

/// Every command's schema: `(file stem, schema)`, the stem naming the
/// command (`peer-add` for `keibictl peer add --json`).
pub fn schemas() -> Vec<(&'static str, serde_json::Value)> {
    fn of<T: JsonSchema>() -> serde_json::Value {
        let mut v = schemars::schema_for!(T).to_value();
        close_objects(&mut v);
        v
    }
    vec![
        ("status", of::<StatusOutput>()),
        ("status-files", of::<Vec<NotLocal>>()),
        ("check", of::<CheckReport>()),
        ("id", of::<PeerIdentity>()),
        ("peer-add", of::<PeerInfo>()),
        ("peer-list", of::<Vec<PeerInfo>>()),
        ("peer-remove", of::<PeerInfo>()),
        ("peer-bench", of::<BenchReport>()),
        ("debug-ops", of::<DebugOpsOutput>()),
        ("debug-passthrough", of::<PassthroughOutput>()),
        ("wait", of::<WaitOutput>()),
        ("prefetch", of::<PrefetchOutput>()),
    ]
}

/// Set `additionalProperties: false` on every object schema that lists
/// its properties and says nothing of others (maps keep theirs).
fn close_objects(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), false.into());
            }
            for child in map.values_mut() {
                close_objects(child);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// Any value as pretty JSON and a newline.
pub fn to_json<T: Serialize>(value: &T) -> Result<String, String> {
    let mut s = serde_json::to_string_pretty(value)
        .map_err(|e| format!("cannot encode the answer as JSON: {e}"))?;
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/json-schema")
    }

    /// The checked-in schemas are what the types say; with
    /// `KEIBI_BLESS_SCHEMAS=1` they are rewritten instead.
    #[test]
    fn schema_files_are_up_to_date() {
        let bless = std::env::var_os("KEIBI_BLESS_SCHEMAS").is_some();
        let mut stale = Vec::new();
        let mut names = Vec::new();
        for (name, schema) in schemas() {
            let path = dir().join(format!("{name}.json"));
            let want = to_json(&schema).expect("encode");
            names.push(format!("{name}.json"));
            if bless {
                std::fs::create_dir_all(dir()).expect("create docs/json-schema");
                std::fs::write(&path, &want).expect("write the schema");
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(&want) {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "stale JSON schemas (rewrite them with `KEIBI_BLESS_SCHEMAS=1 cargo test -p keibictl schema`): {stale:?}"
        );
        // No schema file of a command that no longer exists.
        let mut on_disk: Vec<String> = std::fs::read_dir(dir())
            .expect("docs/json-schema")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        names.sort();
        assert_eq!(on_disk, names, "files in docs/json-schema");
    }

    #[test]
    fn objects_are_closed_and_the_status_keeps_its_flat_fields() {
        let (_, status) = schemas().remove(0);
        let text = status.to_string();
        assert!(text.contains("\"additionalProperties\":false"), "{text}");
        assert!(status["properties"]["uptime_secs"].is_object(), "{status}");
        assert!(status["properties"]["sync"].is_object(), "{status}");
    }
}
