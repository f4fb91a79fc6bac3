//! The few etcd calls the cluster makes, each bounded in time: a silent
//! etcd (stopped, partitioned) must cost a timeout, never a hung thread.

use etcdv3client::pb::{self, compare, response_op};
use etcdv3client::EtcdClient;
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
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The revision that created the key (a coordinator's epoch).
    pub create_revision: i64,
    pub lease: i64,
}

impl From<pb::KeyValue> for Entry {
    fn from(kv: pb::KeyValue) -> Entry {
        Entry { key: kv.key, value: kv.value, create_revision: kv.create_revision, lease: kv.lease }
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

    /// One renewal: the TTL etcd restarted the lease with, 0 if it had
    /// already expired. Each renewal opens its own keep-alive stream and
    /// reads the one answer to the request that opening it sends: on a
    /// long-lived stream an answer read late is an old one (a TTL granted
    /// before a freeze would reopen the fence of a node whose lease is gone).
    pub async fn renew(&self, lease: i64) -> Result<i64, EtcdError> {
        let mut c = self.client.clone();
        let call = async move {
            let mut stream = c.keep_lease_alive(lease).await?;
            stream.message().await
        };
        match self.bounded("a lease renewal", call).await? {
            Some(r) if r.id == lease => Ok(r.ttl),
            Some(r) => Err(EtcdError::Request { what: "a lease renewal", detail: format!("answer for lease {:x}, not {lease:x}", r.id) }),
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
        let (ok, found, revision) = self.txn(vec![created_at(key, compare::CompareResult::Equal, 0)], vec![put(key, value, lease)], key).await?;
        if ok {
            return Ok(Ok(revision));
        }
        // Deleted between the compare and the read: as if created by
        // nobody; the caller tries again at its next tick.
        found.map(Err).ok_or_else(|| EtcdError::Request { what: "a transaction", detail: format!("'{key}' changed during the transaction") })
    }

    /// The coordinator's commit of a barrier: writes `decision` = "commit"
    /// and `record` at `record_key`, only if the coordinator key is still
    /// the one created at `epoch`, nobody decided the barrier yet, and no
    /// node joined after `listed` (the revision its node list was read at:
    /// a node that joined since would not have held).
    pub async fn commit(&self, c: &CommitKeys<'_>, records: Vec<(String, Vec<u8>)>) -> Result<bool, EtcdError> {
        let mut joined_since = created_at(c.nodes, compare::CompareResult::Less, c.listed + 1);
        joined_since.range_end = prefix_end(c.nodes);
        let compares = vec![created_at(c.coordinator, compare::CompareResult::Equal, c.epoch), created_at(c.decision, compare::CompareResult::Equal, 0), joined_since];
        let mut writes = vec![put(c.decision, b"commit".to_vec(), 0)];
        writes.extend(records.into_iter().map(|(key, value)| put(&key, value, 0)));
        Ok(self.txn(compares, writes, c.decision).await?.0)
    }

    /// A node whose hold outlived its wait: decides the barrier "abort"
    /// unless it is decided already. Returns whether it was committed.
    pub async fn settle(&self, decision: &str) -> Result<bool, EtcdError> {
        let (aborted_now, found, _) = self.txn(vec![created_at(decision, compare::CompareResult::Equal, 0)], vec![put(decision, b"abort".to_vec(), 0)], decision).await?;
        Ok(!aborted_now && found.is_some_and(|e| e.value == b"commit"))
    }

    /// Runs `compares` → `writes`, else reads `key`: (succeeded, what `key`
    /// held when it failed, the revision).
    async fn txn(&self, compares: Vec<pb::Compare>, writes: Vec<pb::RequestOp>, key: &str) -> Result<(bool, Option<Entry>, i64), EtcdError> {
        let txn = pb::TxnRequest { compare: compares, success: writes, failure: vec![pb::RangeRequest::new(key.as_bytes().to_vec()).into()] };
        let mut kv = self.client.kv.clone();
        let r = self.bounded("a transaction", kv.txn(txn)).await?;
        let revision = r.header.map_or(0, |h| h.revision);
        let found = r.responses.into_iter().find_map(|op| match op.response {
            Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next().map(Entry::from),
            _ => None,
        });
        Ok((r.succeeded, found, revision))
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), EtcdError> {
        let mut kv = self.client.kv.clone();
        let request = pb::PutRequest { key: key.as_bytes().to_vec(), value, lease, ..Default::default() };
        self.bounded("a put", kv.put(request)).await.map(drop)
    }

    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        let mut kv = self.client.kv.clone();
        let request = pb::DeleteRangeRequest { key: key.as_bytes().to_vec(), ..Default::default() };
        self.bounded("a delete", kv.delete_range(request)).await.map(drop)
    }

    /// Deletes `key` only if it is bound to `lease` (a claim of ours, not
    /// one another node made after ours went with an old lease).
    pub async fn delete_if_lease(&self, key: &str, lease: i64) -> Result<(), EtcdError> {
        let compare = pb::Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Lease as i32,
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
            target_union: Some(compare::TargetUnion::Lease(lease)),
        };
        let delete: pb::RequestOp = pb::DeleteRangeRequest { key: key.as_bytes().to_vec(), ..Default::default() }.into();
        self.txn(vec![compare], vec![delete], key).await.map(drop)
    }

    pub async fn get(&self, key: &str) -> Result<Option<Entry>, EtcdError> {
        let mut kv = self.client.kv.clone();
        let r = self.bounded("a read", kv.range(pb::RangeRequest::new(key.as_bytes().to_vec()))).await?;
        Ok(r.kvs.into_iter().next().map(Entry::from))
    }

    /// Every key under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Entry>, EtcdError> {
        Ok(self.list_at(prefix).await?.0)
    }

    /// `list`, and the revision it was read at.
    pub async fn list_at(&self, prefix: &str) -> Result<(Vec<Entry>, i64), EtcdError> {
        let mut kv = self.client.kv.clone();
        let r = self.bounded("a read", kv.range(pb::RangeRequest::new(prefix.as_bytes().to_vec()).with_prefix())).await?;
        Ok((r.kvs.into_iter().map(Entry::from).collect(), r.header.map_or(0, |h| h.revision)))
    }
}

/// The keys a barrier's commit checks (and its decision, which it writes).
pub struct CommitKeys<'a> {
    pub coordinator: &'a str,
    pub epoch: i64,
    pub nodes: &'a str,
    pub listed: i64,
    pub decision: &'a str,
}

/// `key`'s create revision compared with `revision` (0: the key is absent).
fn created_at(key: &str, result: compare::CompareResult, revision: i64) -> pb::Compare {
    pb::Compare {
        result: result as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.as_bytes().to_vec(),
        range_end: Vec::new(),
        target_union: Some(compare::TargetUnion::CreateRevision(revision)),
    }
}

fn put(key: &str, value: Vec<u8>, lease: i64) -> pb::RequestOp {
    pb::PutRequest { key: key.as_bytes().to_vec(), value, lease, ..Default::default() }.into()
}

/// The end of the range of every key starting with `prefix` (etcd's
/// convention: the prefix with its last byte incremented).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
