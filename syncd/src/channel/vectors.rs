//! The published Noise test vectors, run through snow with keibi's
//! resolver (x25519-dalek, chacha20poly1305, sha2) instead of snow's
//! own crypto: a check of our primitives and their wiring that does not
//! depend on snow agreeing with itself.
//!
//! The vectors are cacophony's (every `*_25519_ChaChaPoly_SHA256`
//! protocol, keibi's `Noise_XX_25519_ChaChaPoly_SHA256` among them),
//! kept in `syncd/tests/vectors/cacophony-25519-chachapoly-sha256.json`
//! with their source named in the file. Each vector fixes both sides'
//! static and ephemeral keys, prologue and PSKs; every handshake and
//! transport message must encrypt to the published ciphertext, decrypt
//! back to the payload, and the final handshake hash must match.

use super::resolver::KeibiResolver;
use data_encoding::HEXLOWER_PERMISSIVE;
use serde_json::Value;
use snow::params::{HandshakeModifier, NoiseParams};
use snow::{Builder, HandshakeState};

const FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/cacophony-25519-chachapoly-sha256.json"
);

fn hex(v: &Value, field: &str) -> Option<Vec<u8>> {
    let s = v.get(field)?.as_str()?;
    Some(
        HEXLOWER_PERMISSIVE
            .decode(s.as_bytes())
            .unwrap_or_else(|e| panic!("{field}: bad hex: {e}")),
    )
}

fn psks(v: &Value, field: &str) -> Vec<Vec<u8>> {
    v.get(field)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|p| {
                    HEXLOWER_PERMISSIVE
                        .decode(p.as_str().expect("psk string").as_bytes())
                        .expect("psk hex")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Build one side of a vector with keibi's resolver.
fn side(v: &Value, params: &NoiseParams, initiator: bool) -> HandshakeState {
    let who = if initiator { "init" } else { "resp" };
    let s = hex(v, &format!("{who}_static"));
    let e = hex(v, &format!("{who}_ephemeral"));
    let rs = hex(v, &format!("{who}_remote_static"));
    let prologue = hex(v, &format!("{who}_prologue")).unwrap_or_default();
    let psks = psks(v, &format!("{who}_psks"));
    let mut b = Builder::with_resolver(params.clone(), Box::new(KeibiResolver));
    let mut slots = params
        .handshake
        .modifiers
        .list
        .iter()
        .filter_map(|m| match m {
            HandshakeModifier::Psk(n) => Some(*n),
            _ => None,
        });
    for psk in &psks {
        let slot = slots.next().expect("a PSK slot for each PSK");
        let key: &[u8; 32] = psk.as_slice().try_into().expect("32-byte PSK");
        b = b.psk(slot, key).expect("psk");
    }
    if let Some(s) = &s {
        b = b.local_private_key(s).expect("static");
    }
    if let Some(rs) = &rs {
        b = b.remote_public_key(rs).expect("remote static");
    }
    if let Some(e) = &e {
        b = b.fixed_ephemeral_key_for_testing_only(e);
    }
    b = b.prologue(&prologue).expect("prologue");
    if initiator {
        b.build_initiator().expect("initiator")
    } else {
        b.build_responder().expect("responder")
    }
}

/// Run one vector; `Err` says where it differs.
fn run(v: &Value) -> Result<(), String> {
    let name = v["protocol_name"].as_str().expect("name");
    let params: NoiseParams = name.parse().map_err(|e| format!("{name}: {e:?}"))?;
    let oneway = params.handshake.pattern.is_oneway();
    let mut init = side(v, &params, true);
    let mut resp = side(v, &params, false);
    let messages = v["messages"].as_array().expect("messages");
    let mut out = vec![0u8; 65_535];
    let mut back = vec![0u8; 65_535];
    let mut i = 0;
    while !init.is_handshake_finished() {
        let m = &messages[i];
        let payload = hex(m, "payload").expect("payload");
        let expect = hex(m, "ciphertext").expect("ciphertext");
        let (tx, rx) = if i % 2 == 0 {
            (&mut init, &mut resp)
        } else {
            (&mut resp, &mut init)
        };
        let n = tx
            .write_message(&payload, &mut out)
            .map_err(|e| format!("{name}: write message {i}: {e}"))?;
        if out[..n] != expect[..] {
            return Err(format!("{name}: handshake message {i} differs"));
        }
        let k = rx
            .read_message(&out[..n], &mut back)
            .map_err(|e| format!("{name}: read message {i}: {e}"))?;
        if back[..k] != payload[..] {
            return Err(format!("{name}: handshake payload {i} differs"));
        }
        i += 1;
    }
    if let Some(h) = hex(v, "handshake_hash")
        && (init.get_handshake_hash() != &h[..] || resp.get_handshake_hash() != &h[..])
    {
        return Err(format!("{name}: handshake hash differs"));
    }
    let mut init = init.into_transport_mode().map_err(|e| e.to_string())?;
    let mut resp = resp.into_transport_mode().map_err(|e| e.to_string())?;
    for (j, m) in messages.iter().enumerate().skip(i) {
        let payload = hex(m, "payload").expect("payload");
        let expect = hex(m, "ciphertext").expect("ciphertext");
        let (tx, rx) = if oneway || j % 2 == 0 {
            (&mut init, &mut resp)
        } else {
            (&mut resp, &mut init)
        };
        let n = tx
            .write_message(&payload, &mut out)
            .map_err(|e| format!("{name}: transport write {j}: {e}"))?;
        if out[..n] != expect[..] {
            return Err(format!("{name}: transport message {j} differs"));
        }
        let k = rx
            .read_message(&out[..n], &mut back)
            .map_err(|e| format!("{name}: transport read {j}: {e}"))?;
        if back[..k] != payload[..] {
            return Err(format!("{name}: transport payload {j} differs"));
        }
    }
    Ok(())
}

#[test]
fn cacophony_vectors_pass_with_keibis_resolver() {
    let text = std::fs::read_to_string(FILE).expect("the vectors file");
    let doc: Value = serde_json::from_str(&text).expect("json");
    assert!(
        doc["source"]
            .as_str()
            .is_some_and(|s| s.contains("cacophony")),
        "the file names its source"
    );
    let vectors = doc["vectors"].as_array().expect("vectors");
    let names: Vec<&str> = vectors
        .iter()
        .map(|v| v["protocol_name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        vectors.len(),
        59,
        "the whole 25519/ChaChaPoly/SHA256 subset"
    );
    assert!(
        names.contains(&super::handshake::NOISE_PARAMS),
        "keibi's own pattern"
    );
    let failures: Vec<String> = vectors.iter().filter_map(|v| run(v).err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_changed_vector_fails() {
    // The check can fail: one flipped ciphertext byte is caught.
    let text = std::fs::read_to_string(FILE).expect("the vectors file");
    let doc: Value = serde_json::from_str(&text).expect("json");
    let mut v = doc["vectors"]
        .as_array()
        .expect("vectors")
        .iter()
        .find(|v| v["protocol_name"] == super::handshake::NOISE_PARAMS)
        .expect("XX vector")
        .clone();
    let ct = v["messages"][1]["ciphertext"]
        .as_str()
        .expect("ct")
        .to_string();
    let flipped = format!(
        "{}{}",
        if ct.starts_with('0') { "1" } else { "0" },
        &ct[1..]
    );
    v["messages"][1]["ciphertext"] = Value::String(flipped);
    let err = run(&v).expect_err("must differ");
    assert!(err.contains("handshake message 1 differs"), "{err}");
}
