//! The paired peers: the sled tree `peers`, and the parsing of what people
//! type to name a peer (its fingerprint) and where to reach it (its
//! address).
//!
//! One key per peer: the 52-character fingerprint (upper case, ungrouped,
//! as [`crate::identity::fingerprint_of`] makes it); the value is a
//! [`PeerRecord`] in postcard. Adding and removing a peer flush the store
//! before they answer, so a peer `keibictl peer add` reported is still
//! paired after a crash, and a removed one stays removed. The last-seen
//! time is written without a flush (sled writes its log within 500 ms):
//! losing the last moments of it in a crash costs nothing.
//!
//! Every method blocks on sled; callers on an async runtime run them on
//! the blocking pool.

use crate::config::DEFAULT_PEER_PORT;
use crate::identity::{FINGERPRINT_BASE32, FINGERPRINT_LEN};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// The sled tree holding the peers.
pub const TREE: &str = "peers";

/// What is kept about one peer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PeerRecord {
    /// The name given with `peer add --name`.
    pub name: Option<String>,
    /// Where to dial it, as [`PeerAddr`]'s `Display` writes it; `None`:
    /// never dialed, only accepted.
    pub addr: Option<String>,
    /// When it was first added (Unix time, milliseconds).
    pub added_unix_ms: u64,
    /// When data last arrived from it (Unix time, milliseconds).
    pub last_seen_unix_ms: Option<u64>,
}

/// A failure of the peers tree.
#[derive(Debug, thiserror::Error)]
pub enum PeersError {
    /// sled failed.
    #[error("peers store: {0}")]
    Store(#[from] sled::Error),
    /// A value that does not decode.
    #[error("peers store: the record of {fingerprint} is corrupt: {what}")]
    Corrupt {
        /// The key.
        fingerprint: String,
        /// The decoder's complaint.
        what: String,
    },
}

/// The `peers` tree of the store. Cheap to clone (sled handles).
#[derive(Clone)]
pub struct Peers {
    db: sled::Db,
    tree: sled::Tree,
}

impl Peers {
    /// The peers tree of `db` (made empty when it is not there yet).
    pub fn open(db: &sled::Db) -> Result<Peers, PeersError> {
        Ok(Peers {
            db: db.clone(),
            tree: db.open_tree(TREE)?,
        })
    }

    /// The record of `fingerprint`, if it was added.
    pub fn get(&self, fingerprint: &str) -> Result<Option<PeerRecord>, PeersError> {
        match self.tree.get(fingerprint.as_bytes())? {
            Some(v) => decode(fingerprint, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Every peer, by fingerprint.
    pub fn list(&self) -> Result<Vec<(String, PeerRecord)>, PeersError> {
        let mut out = Vec::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            let fingerprint = String::from_utf8_lossy(&k).into_owned();
            let rec = decode(&fingerprint, &v)?;
            out.push((fingerprint, rec));
        }
        Ok(out)
    }

    /// Add `fingerprint`, or change its name and address (keeping when it
    /// was added and last seen); flushed before it returns. Answers the
    /// record now stored.
    pub fn add(
        &self,
        fingerprint: &str,
        addr: Option<String>,
        name: Option<String>,
        now_unix_ms: u64,
    ) -> Result<PeerRecord, PeersError> {
        let rec = match self.get(fingerprint)? {
            Some(old) => PeerRecord { name, addr, ..old },
            None => PeerRecord {
                name,
                addr,
                added_unix_ms: now_unix_ms,
                last_seen_unix_ms: None,
            },
        };
        self.tree.insert(fingerprint.as_bytes(), encode(&rec))?;
        self.db.flush()?;
        Ok(rec)
    }

    /// Remove `fingerprint`; flushed before it returns. Answers the record
    /// it had, or `None` when it was not there.
    pub fn remove(&self, fingerprint: &str) -> Result<Option<PeerRecord>, PeersError> {
        let old = self.tree.remove(fingerprint.as_bytes())?;
        self.db.flush()?;
        match old {
            Some(v) => decode(fingerprint, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Record that data arrived from `fingerprint` at `unix_ms` (not
    /// flushed). Does nothing when the peer was removed meanwhile, so a
    /// late update cannot bring a removed peer back.
    pub fn set_last_seen(&self, fingerprint: &str, unix_ms: u64) -> Result<(), PeersError> {
        let mut failed = None;
        self.tree
            .fetch_and_update(fingerprint.as_bytes(), |old| {
                let old = old?;
                match decode(fingerprint, old) {
                    Ok(mut rec) => {
                        rec.last_seen_unix_ms = Some(unix_ms);
                        Some(encode(&rec))
                    }
                    Err(e) => {
                        // Left as it is.
                        failed = Some(e);
                        Some(old.to_vec())
                    }
                }
            })
            .map_err(PeersError::Store)?;
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn encode(rec: &PeerRecord) -> Vec<u8> {
    // Options, strings and integers: postcard cannot fail on them.
    postcard::to_allocvec(rec).unwrap_or_default()
}

fn decode(fingerprint: &str, bytes: &[u8]) -> Result<PeerRecord, PeersError> {
    postcard::from_bytes(bytes).map_err(|e| PeersError::Corrupt {
        fingerprint: fingerprint.to_string(),
        what: e.to_string(),
    })
}

/// Normalise a fingerprint as people type it: case-insensitive, spaces,
/// tabs and `-` ignored (so the grouped form of `keibictl id` is taken as
/// it is). It must then be [`FINGERPRINT_LEN`] base32 characters (A–Z,
/// 2–7) that decode to 32 bytes. Answers the canonical form (upper case,
/// ungrouped) or what is wrong.
pub fn parse_fingerprint(input: &str) -> Result<String, String> {
    let canonical: String = input
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if canonical.is_empty() {
        return Err("the fingerprint is empty".into());
    }
    if let Some((i, c)) = canonical
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_uppercase() || ('2'..='7').contains(c)))
    {
        return Err(format!(
            "{input:?}: character {c:?} at position {} is not base32: only A-Z and 2-7 appear in a fingerprint",
            i + 1
        ));
    }
    if canonical.len() != FINGERPRINT_LEN {
        return Err(format!(
            "{input:?}: {} characters, a fingerprint has {FINGERPRINT_LEN} (`keibictl id` on the other machine shows it)",
            canonical.len()
        ));
    }
    match FINGERPRINT_BASE32.decode(canonical.as_bytes()) {
        Ok(bytes) if bytes.len() == 32 => Ok(canonical),
        Ok(bytes) => Err(format!(
            "{input:?}: decodes to {} bytes, a fingerprint is 32",
            bytes.len()
        )),
        // 52 characters carry 260 bits: the last one's 4 spare bits are 0
        // in every real fingerprint, so a typo there is caught too.
        Err(e) => Err(format!("{input:?}: not a fingerprint ({e})")),
    }
}

/// Where to dial a peer: a host name or IP address, and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAddr {
    /// A host name (resolved at each dial) or an IP address (IPv6 without
    /// brackets).
    pub host: String,
    /// The TCP port.
    pub port: u16,
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.parse::<Ipv6Addr>().is_ok() {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The longest host name DNS allows.
const MAX_HOST_LEN: usize = 253;

/// Parse a peer address: `host:port`, `host` (port [`DEFAULT_PEER_PORT`]),
/// `IPv4[:port]`, `[IPv6]:port`, `[IPv6]` or a bare IPv6 address. A host
/// name is letters, digits, `-` and `.` (at most 253 characters, labels of
/// 1 to 63); the port is 1 to 65535. Answers the address or what is wrong.
pub fn parse_addr(input: &str) -> Result<PeerAddr, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("the address is empty".into());
    }
    let bad_port = |p: &str| format!("{input:?}: port {p:?} is not a number from 1 to 65535");
    let parse_port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad_port(p)),
        Ok(n) => Ok(n),
    };
    // [IPv6] or [IPv6]:port
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{input:?}: '[' without ']'"))?;
        let ip: Ipv6Addr = inside
            .parse()
            .map_err(|_| format!("{input:?}: {inside:?} is not an IPv6 address"))?;
        let port = match after {
            "" => DEFAULT_PEER_PORT,
            _ => match after.strip_prefix(':') {
                Some(p) => parse_port(p)?,
                None => return Err(format!("{input:?}: expected ':PORT' after ']'")),
            },
        };
        return Ok(PeerAddr {
            host: ip.to_string(),
            port,
        });
    }
    // A bare IPv6 address (two colons or more): no port.
    if s.matches(':').count() > 1 {
        let ip: Ipv6Addr = s.parse().map_err(|_| {
            format!(
                "{input:?}: not an IPv6 address (write an IPv6 address with a port as [ADDR]:PORT)"
            )
        })?;
        return Ok(PeerAddr {
            host: ip.to_string(),
            port: DEFAULT_PEER_PORT,
        });
    }
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, parse_port(p)?),
        None => (s, DEFAULT_PEER_PORT),
    };
    if host.is_empty() {
        return Err(format!("{input:?}: no host before the port"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(PeerAddr {
            host: ip.to_string(),
            port,
        });
    }
    check_host_name(host).map_err(|why| format!("{input:?}: {why}"))?;
    Ok(PeerAddr {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn check_host_name(host: &str) -> Result<(), String> {
    if host.len() > MAX_HOST_LEN {
        return Err(format!(
            "the host name has {} characters, at most {MAX_HOST_LEN} are allowed",
            host.len()
        ));
    }
    if let Some(c) = host
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return Err(format!(
            "{c:?} cannot appear in a host name (letters, digits, '-' and '.')"
        ));
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{host:?} has an empty or over-long (> 63) part between dots"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "the part {label:?} of the host name starts or ends with '-'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::fingerprint_of;

    #[test]
    fn fingerprints_are_normalised() {
        let fp = fingerprint_of(&[7u8; 32]);
        assert_eq!(parse_fingerprint(&fp), Ok(fp.clone()));
        // Grouped as `keibictl id` prints it, lower case, with dashes.
        let grouped = crate::identity::group(&fp);
        assert_eq!(parse_fingerprint(&grouped), Ok(fp.clone()));
        assert_eq!(parse_fingerprint(&grouped.to_lowercase()), Ok(fp.clone()));
        let dashed = grouped.replace(' ', "-");
        assert_eq!(parse_fingerprint(&format!("  {dashed}\t")), Ok(fp.clone()));
    }

    #[test]
    fn bad_fingerprints_say_what_is_wrong() {
        let fp = fingerprint_of(&[7u8; 32]);
        let cases = [
            (String::new(), "empty"),
            ("  - ".to_string(), "empty"),
            (fp[..51].to_string(), "51 characters"),
            (format!("{fp}A"), "53 characters"),
            (format!("{}1", &fp[..51]), "'1'"),
            (format!("{}0", &fp[..51]), "'0'"),
            (format!("{}=", &fp[..51]), "'='"),
            (format!("é{}", &fp[1..]), "'é' at position 1"),
        ];
        for (bad, says) in cases {
            let err = parse_fingerprint(&bad).expect_err(&bad);
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        // The last character carries 4 spare bits that are always 0: a
        // last character with one of them set is no fingerprint.
        let last = fp.as_bytes()[51];
        let idx = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
            .find(last as char)
            .expect("base32");
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        let bad = format!("{}{}", &fp[..51], alphabet[idx ^ 1] as char);
        let err = parse_fingerprint(&bad).expect_err("trailing bits");
        assert!(err.contains("not a fingerprint"), "{err}");
    }

    #[test]
    fn addresses_parse_with_the_default_port() {
        let ok = [
            ("peer.example.org:4000", "peer.example.org", 4000),
            ("Peer.Example.org", "peer.example.org", DEFAULT_PEER_PORT),
            ("192.0.2.7", "192.0.2.7", DEFAULT_PEER_PORT),
            ("192.0.2.7:1", "192.0.2.7", 1),
            (" 10.0.0.1:65535 ", "10.0.0.1", 65535),
            ("[2001:db8::1]:4000", "2001:db8::1", 4000),
            ("[::1]", "::1", DEFAULT_PEER_PORT),
            ("2001:db8::1", "2001:db8::1", DEFAULT_PEER_PORT),
            ("localhost", "localhost", DEFAULT_PEER_PORT),
            ("host-1.lan.", "host-1.lan.", DEFAULT_PEER_PORT),
        ];
        for (input, host, port) in ok {
            let a = parse_addr(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!((a.host.as_str(), a.port), (host, port), "{input}");
            // Display round-trips.
            assert_eq!(parse_addr(&a.to_string()), Ok(a.clone()), "{input}");
        }
        assert_eq!(
            parse_addr("[2001:db8::1]:4000").expect("v6").to_string(),
            "[2001:db8::1]:4000"
        );
        assert_eq!(
            parse_addr("peer").expect("name").to_string(),
            format!("peer:{DEFAULT_PEER_PORT}")
        );
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        let long = format!("{}.org", "a".repeat(260));
        let cases = [
            ("", "empty"),
            ("host:0", "port \"0\""),
            ("host:70000", "port \"70000\""),
            ("host:", "port \"\""),
            ("host:http", "port \"http\""),
            (":4000", "no host"),
            ("[::1", "without ']'"),
            ("[nothost]:1", "not an IPv6 address"),
            ("[::1]4000", "expected ':PORT'"),
            ("2001:db8::1:99999", "not an IPv6 address"),
            ("host name", "' '"),
            ("host_1:4000", "'_'"),
            ("a..b", "empty or over-long"),
            ("-a.b", "starts or ends with '-'"),
            (long.as_str(), "at most 253"),
        ];
        for (bad, says) in cases {
            let err = parse_addr(bad).expect_err(bad);
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    fn db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .cache_capacity(1024 * 1024)
            .open()
            .expect("sled");
        (dir, db)
    }

    #[test]
    fn the_peers_tree_round_trips_and_survives_reopening() {
        let (dir, db) = db();
        let peers = Peers::open(&db).expect("open");
        let a = fingerprint_of(&[1; 32]);
        let b = fingerprint_of(&[2; 32]);
        assert_eq!(peers.get(&a).expect("get"), None);
        let rec = peers
            .add(
                &a,
                Some("10.0.0.1:4000".into()),
                Some("laptop".into()),
                1000,
            )
            .expect("add a");
        assert_eq!(
            rec,
            PeerRecord {
                name: Some("laptop".into()),
                addr: Some("10.0.0.1:4000".into()),
                added_unix_ms: 1000,
                last_seen_unix_ms: None,
            }
        );
        peers.add(&b, None, None, 2000).expect("add b");
        peers.set_last_seen(&a, 5000).expect("seen");
        // Adding again changes address and name, keeps the times.
        let again = peers
            .add(&a, None, Some("desk".into()), 9999)
            .expect("re-add");
        assert_eq!(again.added_unix_ms, 1000);
        assert_eq!(again.last_seen_unix_ms, Some(5000));
        assert_eq!(again.addr, None);
        drop(peers);
        drop(db);
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .expect("reopen");
        let peers = Peers::open(&db).expect("open");
        let list = peers.list().expect("list");
        assert_eq!(list.len(), 2);
        assert_eq!(
            list.iter().find(|(k, _)| *k == a).map(|(_, r)| r),
            Some(&again)
        );
        assert_eq!(
            peers.remove(&b).expect("remove").map(|r| r.added_unix_ms),
            Some(2000)
        );
        assert_eq!(peers.remove(&b).expect("remove twice"), None);
        // A late last-seen update does not bring a removed peer back.
        peers.set_last_seen(&b, 7000).expect("seen after remove");
        assert_eq!(peers.get(&b).expect("get"), None);
        assert_eq!(peers.list().expect("list").len(), 1);
    }

    #[test]
    fn a_corrupt_record_is_reported_with_its_key() {
        let (_dir, db) = db();
        let peers = Peers::open(&db).expect("open");
        let fp = fingerprint_of(&[3; 32]);
        db.open_tree(TREE)
            .expect("tree")
            .insert(fp.as_bytes(), &[0xff, 0xff, 0xff][..])
            .expect("insert");
        let err = peers.get(&fp).expect_err("corrupt");
        assert!(err.to_string().contains(&fp), "{err}");
        assert!(peers.list().is_err());
    }
}
