//! Shared pools: one bucket prefix served by many hosts, each volume a
//! *family* of its own (a complete pool of today's kind, with its own
//! manifest, lease and log) so that each volume has one owner at a time
//! (`docs/multi-host.md`, section 1).
//!
//! ```text
//! <prefix>/pool                  the shared pool's identity (create-only)
//! <prefix>/names/<volume name>   {"id": "<32 hex>"}: the name's family (create-only)
//! <prefix>/vols/<id>/...         the family: manifest/, segments/, meta/, lease/
//! <prefix>/vols/<id>/refs/<cid>  a clone (family <cid>) reads this template (create-only)
//! <prefix>/vols/<id>/flattened   this clone reads its template no more (create-only)
//! <prefix>/peer-secret           the peer link's secret, 64 hex digits (create-only)
//! ```
//!
//! Names are claimed with a create-only PUT, so of two hosts creating one
//! name at once exactly one wins. A family is made after its name is
//! claimed; a name whose family has no manifest yet is a creation that
//! is under way or died half way (see [`family_prefix`] users).
//!
//! Everything read here comes from the bucket and is checked: the identity
//! and name records are small JSON documents with a size limit and
//! validated fields ([`NameRecord::decode`], fuzzed as `s3_shared`).

#[cfg(feature = "remote")]
use crate::bucket::{latest_generation, read_manifest};
#[cfg(feature = "remote")]
use crate::remote::{Remote, RemoteError};
#[cfg(feature = "remote")]
use crate::store::{OpenError, random_id};
#[cfg(feature = "remote")]
use bytes::Bytes;
use serde::{Deserialize, Serialize};
#[cfg(feature = "remote")]
use std::time::{Duration, Instant};

/// The shared pool's identity object.
pub const POOL_KEY: &str = "pool";
/// Where the names are.
pub const NAMES_DIR: &str = "names";
/// Where the families are.
pub const VOLS_DIR: &str = "vols";
/// The peer link's secret.
pub const PEER_SECRET_KEY: &str = "peer-secret";
/// The identity's `kind`.
pub const KIND: &str = "vpool-shared-pool";
/// Most volumes a shared pool lists (each is a GET when listed).
pub const MAX_VOLUMES: usize = 4096;
/// Largest identity or name record read from the bucket.
const MAX_RECORD_BYTES: usize = 4096;
/// How long each call here may take.
#[cfg(feature = "remote")]
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(feature = "remote")]
fn deadline() -> Instant {
    Instant::now() + CALL_TIMEOUT
}

/// `<prefix>/pool`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedIdentity {
    /// [`KIND`].
    pub kind: String,
    pub version: u32,
    /// Random, 32 hex digits.
    pub id: String,
}

/// `<prefix>/names/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameRecord {
    /// The family's id: 32 lowercase hex digits (it is part of keys).
    pub id: String,
    /// What a FLUSH of this volume promises (`host` or `remote`), on
    /// whichever host owns it; `None`: the owner's setting for the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<String>,
    /// A clone: the sealed template whose blocks it reads where it wrote
    /// none (`docs/multi-host.md` section 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
}

/// The sealed template a clone reads through: its name and family id,
/// neither of which changes once it is sealed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRef {
    pub volume: String,
    pub id: String,
}

fn is_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl NameRecord {
    /// A record from the bucket, checked: size, JSON, an id that is safe
    /// to put in a key.
    pub fn decode(bytes: &[u8]) -> Result<NameRecord, String> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(format!(
                "{} bytes (at most {MAX_RECORD_BYTES})",
                bytes.len()
            ));
        }
        let r: NameRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if !is_id(&r.id) {
            return Err(format!("{:?} is not a family id", r.id));
        }
        if let Some(d) = &r.durability
            && !matches!(d.as_str(), "host" | "remote")
        {
            return Err(format!("durability {d:?} is not host or remote"));
        }
        if let Some(b) = &r.base
            && !(is_id(&b.id) && name_ok(&b.volume))
        {
            return Err(format!("base {:?} ({:?}) is not a volume", b.volume, b.id));
        }
        Ok(r)
    }
}

impl SharedIdentity {
    /// The identity from the bucket, checked.
    pub fn decode(bytes: &[u8]) -> Result<SharedIdentity, String> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(format!(
                "{} bytes (at most {MAX_RECORD_BYTES})",
                bytes.len()
            ));
        }
        let s: SharedIdentity = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if s.kind != KIND || s.version != 1 || !is_id(&s.id) {
            return Err(format!(
                "not a version 1 {KIND} identity (kind {:?}, version {})",
                s.kind, s.version
            ));
        }
        Ok(s)
    }
}

/// Whether `name` may name a volume of a shared pool (it becomes a key).
fn name_ok(name: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    !(name.is_empty() || name.len() > 128 || !name.chars().all(ok) || name.starts_with('.'))
}

#[cfg(feature = "remote")]
/// A volume name as a key part: what the service layer accepts (letters,
/// digits, `.`, `_`, `-`), checked again here because it becomes a key.
fn check_name(name: &str) -> Result<(), OpenError> {
    if !name_ok(name) {
        return Err(OpenError::Corrupt(format!(
            "{name:?} cannot name a volume of a shared pool"
        )));
    }
    Ok(())
}

#[cfg(feature = "remote")]
fn name_key(name: &str) -> String {
    format!("{NAMES_DIR}/{name}")
}

#[cfg(feature = "remote")]
/// Where family `id` lives, under the shared pool's prefix.
pub fn family_prefix(id: &str) -> String {
    format!("{VOLS_DIR}/{id}")
}

#[cfg(feature = "remote")]
/// Makes a shared pool at `remote`: refused where a pool (shared or not)
/// already is. Returns its id.
pub fn create_shared(remote: &Remote) -> Result<String, OpenError> {
    let url = remote.display().to_string();
    if latest_generation(remote, deadline())?.is_some() {
        return Err(OpenError::PoolExists { url });
    }
    let ident = SharedIdentity {
        kind: KIND.into(),
        version: 1,
        id: random_id(),
    };
    let body = serde_json::to_vec(&ident).expect("the identity encodes");
    match remote.put_create(POOL_KEY, Bytes::from(body), Some(deadline()), &|| false) {
        Ok(()) => Ok(ident.id),
        Err(RemoteError::AlreadyExists { .. }) => Err(OpenError::PoolExists { url }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(feature = "remote")]
/// The shared pool at `remote`: [`OpenError::NoPool`] if there is none,
/// [`OpenError::Corrupt`] if its identity is not one.
pub fn check_shared(remote: &Remote) -> Result<SharedIdentity, OpenError> {
    let url = remote.display().to_string();
    let Some(bytes) = remote.get(POOL_KEY, deadline())? else {
        return Err(OpenError::NoPool { url });
    };
    SharedIdentity::decode(&bytes).map_err(|e| OpenError::Corrupt(format!("{url}/{POOL_KEY}: {e}")))
}

#[cfg(feature = "remote")]
/// Claims `name` for a new family; returns its id, or `None` if the name
/// is taken.
pub fn claim_name(
    remote: &Remote,
    name: &str,
    durability: Option<crate::Durability>,
    base: Option<BaseRef>,
) -> Result<Option<String>, OpenError> {
    check_name(name)?;
    let rec = NameRecord {
        id: random_id(),
        durability: durability.map(|d| d.to_string()),
        base,
    };
    if let Some(b) = &rec.base {
        // Before the name: a clone that exists is always listed in its
        // template's refs (a ref whose name was never made, because the
        // name was taken or the host died, names no clone: stale).
        add_ref(&remote.child(&family_prefix(&b.id)), &rec.id)?;
    }
    let body = serde_json::to_vec(&rec).expect("the record encodes");
    match remote.put_create(
        &name_key(name),
        Bytes::from(body),
        Some(deadline()),
        &|| false,
    ) {
        Ok(()) => Ok(Some(rec.id)),
        Err(RemoteError::AlreadyExists { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(feature = "remote")]
/// The id of the family named `name`; `None`: no such volume.
pub fn lookup(remote: &Remote, name: &str) -> Result<Option<String>, OpenError> {
    Ok(lookup_record(remote, name)?.map(|r| r.id))
}

#[cfg(feature = "remote")]
/// The name record of volume `name`; `None`: no such volume.
pub fn lookup_record(remote: &Remote, name: &str) -> Result<Option<NameRecord>, OpenError> {
    check_name(name)?;
    let Some(bytes) = remote.get(&name_key(name), deadline())? else {
        return Ok(None);
    };
    NameRecord::decode(&bytes)
        .map(Some)
        .map_err(|e| OpenError::Corrupt(format!("{NAMES_DIR}/{name}: {e}")))
}

#[cfg(feature = "remote")]
/// Every volume name of the pool, sorted (at most [`MAX_VOLUMES`]).
pub fn list_names(remote: &Remote) -> Result<Vec<String>, OpenError> {
    let listed = remote.list(NAMES_DIR, deadline())?;
    let mut names: Vec<String> = listed
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix(&format!("{NAMES_DIR}/")).map(str::to_string))
        .filter(|n| check_name(n).is_ok())
        .collect();
    names.sort();
    if names.len() > MAX_VOLUMES {
        tracing::warn!(
            pool = remote.display(),
            volumes = names.len(),
            "a shared pool lists more volumes than vpool shows; the rest are left out"
        );
        names.truncate(MAX_VOLUMES);
    }
    Ok(names)
}

#[cfg(feature = "remote")]
/// Deletes the name record of `name`; returns the family's id (`None`:
/// there was no such name).
pub fn delete_name(remote: &Remote, name: &str) -> Result<Option<String>, OpenError> {
    let Some(id) = lookup(remote, name)? else {
        return Ok(None);
    };
    remote.delete(&name_key(name), deadline())?;
    Ok(Some(id))
}

#[cfg(feature = "remote")]
/// Deletes every object of family `id`, its manifests last (a family
/// with a manifest left still opens, and lists what is missing as
/// damage rather than vanishing half way). Returns how many.
pub fn delete_family(remote: &Remote, id: &str) -> Result<u64, OpenError> {
    if !is_id(id) {
        return Err(OpenError::Corrupt(format!("{id:?} is not a family id")));
    }
    let family = remote.child(&family_prefix(id));
    let mut keys: Vec<String> = family
        .list("", deadline())?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    keys.sort_by_key(|k| k.starts_with(crate::manifest::MANIFEST_DIR));
    for k in &keys {
        family.delete(k, deadline())?;
    }
    Ok(keys.len() as u64)
}

#[cfg(feature = "remote")]
/// Who owns a family, from its latest manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyOwner {
    /// The latest manifest's generation (`None`: the family has no
    /// manifest yet: its creation is under way, or died half way).
    pub generation: Option<u64>,
    /// `host:pid` of the lease holder; `None`: released (or no manifest).
    pub holder: Option<String>,
    /// The holder's host name.
    pub host: Option<String>,
    /// The generation that took the lease (the epoch in its keys).
    pub epoch: Option<u64>,
    /// The holder's lease expiry, in milliseconds.
    pub lease_expire_ms: Option<u64>,
    /// When the holder took the lease (Unix milliseconds, its clock).
    pub since_unix_ms: Option<u64>,
    /// Segments in the bucket.
    pub segments: u64,
    /// The holder's peer link address.
    pub peer: Option<String>,
    /// A sealed template (the release that sealed it says so).
    pub sealed: bool,
}

#[cfg(feature = "remote")]
/// The owner of the family at `family` (a [`Remote`] at its prefix).
pub fn family_owner(family: &Remote) -> Result<FamilyOwner, OpenError> {
    let Some(g) = latest_generation(family, deadline())? else {
        return Ok(FamilyOwner {
            generation: None,
            holder: None,
            host: None,
            epoch: None,
            lease_expire_ms: None,
            since_unix_ms: None,
            segments: 0,
            peer: None,
            sealed: false,
        });
    };
    let m = read_manifest(family, g, deadline())?;
    Ok(FamilyOwner {
        generation: Some(g),
        holder: m.holder.as_ref().map(|h| h.name()),
        host: m.holder.as_ref().map(|h| h.host.clone()),
        epoch: m.holder.as_ref().map(|h| h.epoch),
        lease_expire_ms: m.holder.as_ref().and_then(|h| h.lease_expire_ms),
        since_unix_ms: m.holder.as_ref().and_then(|h| h.since_unix_ms),
        segments: m.segments.len() as u64,
        peer: m.holder.as_ref().and_then(|h| h.peer.clone()),
        sealed: m.sealed,
    })
}

/// Where a template's family records the clones that read it:
/// `refs/<clone family id>`.
pub const REFS_DIR: &str = "refs";

#[cfg(feature = "remote")]
/// The clone family ids that the template's family at `family` lists in
/// its refs (at most [`MAX_VOLUMES`]).
pub fn list_refs(family: &Remote) -> Result<Vec<String>, OpenError> {
    let listed = family.list(REFS_DIR, deadline())?;
    Ok(listed
        .into_iter()
        .filter_map(|(k, _)| k.rsplit('/').next().map(str::to_string))
        .filter(|id| is_id(id))
        .take(MAX_VOLUMES)
        .collect())
}

#[cfg(feature = "remote")]
/// Removes clone `clone_id`'s ref from the template's family at `family`.
pub fn drop_ref(family: &Remote, clone_id: &str) -> Result<(), OpenError> {
    if !is_id(clone_id) {
        return Err(OpenError::Corrupt(format!(
            "{clone_id:?} is not a family id"
        )));
    }
    family.delete(&format!("{REFS_DIR}/{clone_id}"), deadline())?;
    Ok(())
}

#[cfg(feature = "remote")]
/// Records, in the template's family at `family`, that clone `clone_id`
/// reads it (create-only; recording twice is not an error). Made before
/// the clone's name, so a template with clones always lists them (its
/// deletion counts a ref that names no volume as a creation under way).
pub fn add_ref(family: &Remote, clone_id: &str) -> Result<(), OpenError> {
    let key = format!("{REFS_DIR}/{clone_id}");
    match family.put_create(
        &key,
        Bytes::from_static(b"clone"),
        Some(deadline()),
        &|| false,
    ) {
        Ok(()) | Err(RemoteError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// In a clone's family: the clone holds every block of its template that
/// it reads, and reads the template no more (`vol flatten`). Its name
/// record, which is create-only, still names the template.
pub const FLATTENED_KEY: &str = "flattened";

#[cfg(feature = "remote")]
/// Records in the clone's family at `family` that it was flattened from
/// template family `base_id` (create-only; recording twice is not an
/// error). Only once everything the flatten copied is in the bucket.
pub fn mark_flattened(family: &Remote, base_id: &str) -> Result<(), OpenError> {
    if !is_id(base_id) {
        return Err(OpenError::Corrupt(format!(
            "{base_id:?} is not a family id"
        )));
    }
    match family.put_create(
        FLATTENED_KEY,
        Bytes::from(base_id.to_string()),
        Some(deadline()),
        &|| false,
    ) {
        Ok(()) | Err(RemoteError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(feature = "remote")]
/// Whether the clone's family at `family` was flattened (its content is
/// not read: the key's presence is the record).
pub fn is_flattened(family: &Remote) -> Result<bool, OpenError> {
    Ok(family.get(FLATTENED_KEY, deadline())?.is_some())
}

#[cfg(feature = "remote")]
/// The shared pool's peer secret: 32 random bytes in `<prefix>/peer-secret`
/// (64 hex digits), made by the first host that asks (create-only, so
/// every host gets the same one). Whoever can read the bucket knows it:
/// the peer link trusts the bucket's readers, as the data does.
pub fn peer_secret(remote: &Remote) -> Result<[u8; 32], OpenError> {
    for _ in 0..3 {
        if let Some(bytes) = remote.get(PEER_SECRET_KEY, deadline())? {
            return decode_secret(&bytes).ok_or_else(|| {
                OpenError::Corrupt(format!("{PEER_SECRET_KEY}: not 64 hex digits"))
            });
        }
        let fresh: [u8; 32] = rand::random();
        let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
        match remote.put_create(PEER_SECRET_KEY, Bytes::from(hex), Some(deadline()), &|| {
            false
        }) {
            Ok(()) => return Ok(fresh),
            Err(RemoteError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(OpenError::Corrupt(format!(
        "{PEER_SECRET_KEY}: created but not readable"
    )))
}

/// 32 bytes from 64 lowercase hex digits.
pub fn decode_secret(bytes: &[u8]) -> Option<[u8; 32]> {
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(all(test, feature = "remote"))]
mod tests {
    use super::*;
    use object_store::ObjectStore;
    use object_store::memory::InMemory;
    use std::sync::Arc;

    fn remote(bucket: &Arc<dyn ObjectStore>) -> Remote {
        Remote::new(bucket.clone(), "shared", "memory://shared".into()).unwrap()
    }

    #[test]
    fn a_clone_s_name_records_its_base_which_lists_it() {
        let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let r = remote(&bucket);
        create_shared(&r).unwrap();
        let t = claim_name(&r, "golden", None, None).unwrap().unwrap();
        let base = BaseRef {
            volume: "golden".into(),
            id: t.clone(),
        };
        let c = claim_name(&r, "web1", None, Some(base.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(lookup_record(&r, "web1").unwrap().unwrap().base, Some(base));
        let refs = r
            .child(&family_prefix(&t))
            .list(REFS_DIR, deadline())
            .unwrap();
        assert_eq!(refs.len(), 1, "{refs:?}");
        assert!(refs[0].0.ends_with(&c), "{refs:?}");
        let clone_family = r.child(&family_prefix(&c));
        assert!(!is_flattened(&clone_family).unwrap());
        mark_flattened(&clone_family, &t).unwrap();
        mark_flattened(&clone_family, &t).unwrap();
        assert!(is_flattened(&clone_family).unwrap());
        assert!(mark_flattened(&clone_family, "../x").is_err());
        let bad = br#"{"id":"0123456789abcdef0123456789abcdef","base":{"volume":"../x","id":"0123456789abcdef0123456789abcdef"}}"#;
        assert!(NameRecord::decode(bad).is_err());
    }

    #[test]
    fn a_name_is_won_once_and_listed() {
        let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let r = remote(&bucket);
        assert!(matches!(check_shared(&r), Err(OpenError::NoPool { .. })));
        let id = create_shared(&r).unwrap();
        assert_eq!(check_shared(&r).unwrap().id, id);
        assert!(matches!(
            create_shared(&r),
            Err(OpenError::PoolExists { .. })
        ));
        let a = claim_name(&r, "db1", None, None)
            .unwrap()
            .expect("the first claim wins");
        assert_eq!(claim_name(&r, "db1", None, None).unwrap(), None);
        let b = claim_name(&r, "web", Some(crate::Durability::Remote), None)
            .unwrap()
            .unwrap();
        let rec = lookup_record(&r, "web").unwrap().unwrap();
        assert_eq!(rec.durability.as_deref(), Some("remote"));
        assert_ne!(a, b);
        assert_eq!(lookup(&r, "db1").unwrap(), Some(a));
        assert_eq!(lookup(&r, "nope").unwrap(), None);
        assert_eq!(list_names(&r).unwrap(), vec!["db1", "web"]);
        assert!(claim_name(&r, "../x", None, None).is_err());
        let fam = Remote::new(
            bucket.clone(),
            &format!("shared/{}", family_prefix(&b)),
            "f".into(),
        )
        .unwrap();
        assert_eq!(family_owner(&fam).unwrap().generation, None);
        fam.put_create("segments/x", Bytes::from_static(b"1"), None, &|| false)
            .unwrap();
        assert_eq!(delete_name(&r, "web").unwrap(), Some(b.clone()));
        assert_eq!(lookup(&r, "web").unwrap(), None);
        assert_eq!(delete_family(&r, &b).unwrap(), 1);
        assert!(fam.list("", deadline()).unwrap().is_empty());
        assert_eq!(list_names(&r).unwrap(), vec!["db1"]);
        let secret = peer_secret(&r).unwrap();
        assert_eq!(
            peer_secret(&r).unwrap(),
            secret,
            "every host gets the first one"
        );
    }

    #[test]
    fn records_from_the_bucket_are_checked() {
        assert!(NameRecord::decode(br#"{"id":"0123456789abcdef0123456789abcdef"}"#).is_ok());
        assert!(
            NameRecord::decode(
                br#"{"id":"0123456789abcdef0123456789abcdef","durability":"remote"}"#
            )
            .is_ok()
        );
        for bad in [
            &br#"{"id":"../../x"}"#[..],
            br#"{"id":"0123456789ABCDEF0123456789abcdef"}"#,
            br#"{"id":"1","more":1}"#,
            br#"{"id":"0123456789abcdef0123456789abcdef","durability":"disk"}"#,
            b"not json",
            &[b' '; 5000],
        ] {
            assert!(NameRecord::decode(bad).is_err(), "{bad:?}");
        }
        assert!(SharedIdentity::decode(br#"{"kind":"x","version":1,"id":"0"}"#).is_err());
        assert_eq!(decode_secret(&[b'a'; 64]), Some([0xaa; 32]));
        assert_eq!(decode_secret(&[b'A'; 64]), None);
        assert_eq!(decode_secret(&[b'a'; 63]), None);
    }
}
