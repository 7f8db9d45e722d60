//! Who may use the link: the hosts that know the shared pool's secret
//! (a random 32 bytes kept in the pool's bucket, so whoever can read the
//! bucket is a member, the same trust as its credentials).
//!
//! Mutual challenge-response: each side sends a fresh nonce and proves it
//! knows the secret with an HMAC-SHA256 over both nonces and the pool's
//! name, with a different label per direction so that one side's proof
//! cannot be replayed as the other's. MACs are compared in constant time
//! (`subtle`). The link is not encrypted (TLS between daemons is the
//! security issue's work): someone who can change packets between two
//! hosts can change forwarded I/O after the handshake.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::wire::{MAC_BYTES, NONCE_BYTES};

/// A shared pool's peer secret.
#[derive(Clone)]
pub struct Secret(pub [u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Which side proves it knows the secret.
#[derive(Clone, Copy)]
pub enum Side {
    Client,
    Server,
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_BYTES] {
    rand::random()
}

/// The proof `side` sends for a handshake of `pool` with these nonces.
pub fn mac(
    secret: &Secret,
    side: Side,
    pool: &str,
    server_nonce: &[u8; NONCE_BYTES],
    client_nonce: &[u8; NONCE_BYTES],
) -> [u8; MAC_BYTES] {
    let mut m = Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes any key length");
    m.update(match side {
        Side::Client => b"client",
        Side::Server => b"server",
    });
    m.update(&[u8::try_from(pool.len()).unwrap_or(u8::MAX)]);
    m.update(pool.as_bytes());
    m.update(server_nonce);
    m.update(client_nonce);
    m.finalize().into_bytes().into()
}

/// Whether `got` is the proof `side` should have sent.
pub fn verify(
    secret: &Secret,
    side: Side,
    pool: &str,
    server_nonce: &[u8; NONCE_BYTES],
    client_nonce: &[u8; NONCE_BYTES],
    got: &[u8; MAC_BYTES],
) -> bool {
    let want = mac(secret, side, pool, server_nonce, client_nonce);
    want.ct_eq(got).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_for_its_side_pool_and_nonces_only() {
        let s = Secret([7; 32]);
        let (a, b) = (nonce(), nonce());
        let m = mac(&s, Side::Client, "shared", &a, &b);
        assert!(verify(&s, Side::Client, "shared", &a, &b, &m));
        assert!(!verify(&s, Side::Server, "shared", &a, &b, &m));
        assert!(!verify(&s, Side::Client, "other", &a, &b, &m));
        assert!(!verify(&s, Side::Client, "shared", &b, &a, &m));
        assert!(!verify(
            &Secret([8; 32]),
            Side::Client,
            "shared",
            &a,
            &b,
            &m
        ));
    }
}
