//! [`CacheControl`]: the host cache of a pool on object storage, defined by
//! the service layer (`vpool_service::cache`) and re-exported here for the
//! API's handlers and its users.

pub use vpool_service::cache::CacheControl;
