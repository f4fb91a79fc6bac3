//! The few etcd calls the cluster makes, each bounded in time: a silent
//! etcd (stopped, partitioned) must cost a timeout, never a hung thread.

use etcdv3client::pb::{self, compare, response_op};
use etcdv3client::{EtcdClient, LeaseKeepAliver};
use std::future::Future;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot reach etcd at {endpoints}: {detail}")]
    Unreachable { endpoints: String, detail: String },
    #[error("etcd did not answer {what} within {limit:?}")]
    Timeout { what: &'static str, limit: Duration },
    #[error("etcd refused {what}: {detail}")]
    Request { what: &'static str, detail: String },
}

/// One key as etcd holds it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub value: Vec<u8>,
    /// The revision that created the key (a coordinator's epoch).
    pub create_revision: i64,
    pub lease: i64,
}

impl From<pb::KeyValue> for Entry {
    fn from(kv: pb::KeyValue) -> Entry {
        Entry { value: kv.value, create_revision: kv.create_revision, lease: kv.lease }
    }
}

/// A key created only if absent: `Ok(revision)` of the creation, or the
/// entry that was there.
pub type Created = Result<i64, Entry>;

/// An etcd connection whose every call ends within `limit`.
#[derive(Clone)]
pub struct Etcd {
    client: EtcdClient,
    limit: Duration,
}

impl Etcd {
    pub async fn connect(endpoints: &[String], limit: Duration) -> Result<Etcd, EtcdError> {
        let joined = endpoints.join(", ");
        let unreachable = |detail: String| EtcdError::Unreachable { endpoints: joined.clone(), detail };
        let client = tokio::time::timeout(limit, EtcdClient::new(endpoints.to_vec(), None))
            .await
            .map_err(|_| unreachable(format!("no answer within {limit:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(Etcd { client, limit })
    }

    async fn bounded<T>(&self, what: &'static str, call: impl Future<Output = Result<T, etcdv3client::Error>>) -> Result<T, EtcdError> {
        tokio::time::timeout(self.limit, call)
            .await
            .map_err(|_| EtcdError::Timeout { what, limit: self.limit })?
            .map_err(|e| EtcdError::Request { what, detail: e.to_string() })
    }

    /// A new lease: its id and the TTL etcd granted (seconds).
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, i64), EtcdError> {
        let mut c = self.client.clone();
        let r = self.bounded("a lease grant", c.grant_lease(ttl.as_secs() as i64)).await?;
        if !r.error.is_empty() {
            return Err(EtcdError::Request { what: "a lease grant", detail: r.error });
        }
        Ok((r.id, r.ttl))
    }

    pub async fn keeper(&self, lease: i64) -> Result<LeaseKeepAliver, EtcdError> {
        let mut c = self.client.clone();
        self.bounded("a keep-alive stream", c.keep_lease_alive(lease)).await
    }

    /// One renewal: the TTL etcd restarted the lease with, 0 if it had
    /// already expired.
    pub async fn renew(&self, keeper: &mut LeaseKeepAliver) -> Result<i64, EtcdError> {
        let call = async {
            keeper.keep_alive().await?;
            keeper.message().await
        };
        match self.bounded("a lease renewal", call).await? {
            Some(r) => Ok(r.ttl),
            None => Err(EtcdError::Request { what: "a lease renewal", detail: "the keep-alive stream ended".into() }),
        }
    }

    /// Seconds left on `lease`; `None` once it has expired.
    pub async fn ttl_left(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        let mut c = self.client.clone();
        let r = self.bounded("a lease lookup", c.get_lease_info(lease, false)).await?;
        Ok((r.ttl > 0).then_some(r.ttl))
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        self.bounded("a lease revocation", c.revoke_lease(lease)).await
    }

    /// Creates `key` (bound to `lease`, 0 = none) only if it does not exist.
    pub async fn create(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<Created, EtcdError> {
        let absent = pb::Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Create as i32,
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
            target_union: Some(compare::TargetUnion::CreateRevision(0)),
        };
        let put = pb::PutRequest { key: key.as_bytes().to_vec(), value, lease, ..Default::default() };
        let txn = pb::TxnRequest {
            compare: vec![absent],
            success: vec![put.into()],
            failure: vec![pb::RangeRequest::new(key.as_bytes().to_vec()).into()],
        };
        let mut kv = self.client.kv.clone();
        let r = self.bounded("a transaction", kv.txn(txn)).await?;
        if r.succeeded {
            return Ok(Ok(r.header.map_or(0, |h| h.revision)));
        }
        let found = r.responses.into_iter().find_map(|op| match op.response {
            Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
            _ => None,
        });
        match found {
            Some(kv) => Ok(Err(kv.into())),
            // Deleted between the compare and the read: as if created by
            // nobody; the caller tries again at its next tick.
            None => Err(EtcdError::Request { what: "a transaction", detail: format!("'{key}' changed during the transaction") }),
        }
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), EtcdError> {
        let mut kv = self.client.kv.clone();
        let put = pb::PutRequest { key: key.as_bytes().to_vec(), value, lease, ..Default::default() };
        self.bounded("a put", kv.put(put)).await.map(drop)
    }

    /// Every key under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Entry>, EtcdError> {
        let mut kv = self.client.kv.clone();
        let r = self.bounded("a read", kv.range(pb::RangeRequest::new(prefix.as_bytes().to_vec()).with_prefix())).await?;
        Ok(r.kvs.into_iter().map(Entry::from).collect())
    }
}
