//! Denied-connection records: the JSON-lines file the agent writes under the node's
//! log directory and `sluicectl flows` reads. One record per line, schema as
//! [`FlowRecord`]; the file is bounded: past [`MAX_FILE_BYTES`] it is rotated to
//! `<file>.1` (replacing the previous one), so the two together never exceed twice
//! that.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Size at which the record file is rotated.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// One denied connection, or an allowed one where `sluice.dev/log-allowed` asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub node: String,
    /// `deny` or `allow`.
    pub verdict: String,
    /// `ingress` or `egress`, seen from the pod the decision protects.
    pub direction: String,
    /// `NS/POD` or `ip:ADDR`.
    pub src: String,
    pub dst: String,
    /// `TCP`, `UDP`, `SCTP` (or the IP protocol number).
    pub protocol: String,
    pub port: u16,
    /// `isolated`, `denied-by-rule`, `pod-not-yet-programmed`, `spoofed`,
    /// `tunnel-guard`; for an allow, `allowed-by-rule` or `not-isolated`.
    pub reason: String,
    /// `NS/NAME` (or `ClusterNetworkPolicy/NAME`) of each deciding policy.
    pub policies: Vec<String>,
}

impl FlowRecord {
    /// The namespaces a record concerns (of its source and destination pods).
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        [&self.src, &self.dst]
            .into_iter()
            .filter(|e| !e.starts_with("ip:"))
            .filter_map(|e| e.split_once('/').map(|(ns, _)| ns))
    }

    /// One line for people: `TIME NODE VERDICT DIR SRC -> DST PROTO/PORT REASON POLICIES`.
    pub fn text(&self) -> String {
        let policies = if self.policies.is_empty() {
            "-".to_string()
        } else {
            self.policies.join(",")
        };
        format!(
            "{} {} {} {} {} -> {} {}/{} {} {}",
            self.time,
            self.node,
            self.verdict,
            self.direction,
            self.src,
            self.dst,
            self.protocol,
            self.port,
            self.reason,
            policies
        )
    }
}

/// `time` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(time: SystemTime) -> String {
    let d = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The rotated predecessor of `path`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Appends records to the file, rotating it when it grows past `max_bytes`.
pub struct FlowFile {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    size: u64,
}

impl FlowFile {
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<FlowFile> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(FlowFile {
            path: path.to_path_buf(),
            max_bytes,
            file,
            size,
        })
    }

    pub fn append(&mut self, record: &FlowRecord) -> io::Result<()> {
        let mut line = serde_json::to_string(record).map_err(io::Error::other)?;
        line.push('\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            fs::rename(&self.path, rotated(&self.path))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = 0;
        }
        // One write per line: a reader never sees half a record from this writer.
        self.file.write_all(line.as_bytes())?;
        self.size += line.len() as u64;
        Ok(())
    }
}

/// Every record in the rotated file then the current one, oldest first; lines that
/// do not parse (a torn last line) are skipped.
pub fn read_records(path: &Path) -> io::Result<Vec<FlowRecord>> {
    let mut out = Vec::new();
    for p in [rotated(path), path.to_path_buf()] {
        match File::open(&p) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    if let Ok(r) = serde_json::from_str(&line?) {
                        out.push(r);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// What a reader asks of the records: the `flows` op of the node-local API and the
/// query parameters of the agent's `GET /flows` (`since`, `denied`, `namespace`,
/// `limit`, `follow`) are this one type, so both answer the same question the same
/// way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowQuery {
    /// Only records at or after this RFC 3339 instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Only denied connections (allow records left out).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub denied: bool,
    /// Only records whose source or destination pod is in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// At most the last this many of the matching records (before following).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Keep the answer open and send each new matching record as it is made.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("since={0:?} is not an RFC 3339 time (e.g. 2026-12-06T07:00:00Z)")]
    Since(String),
    #[error("{key}={value:?}: expected 1, 0, true or false")]
    Flag { key: String, value: String },
    #[error("limit={0:?} is not a count")]
    Limit(String),
    #[error("unknown parameter {0:?} (since, denied, namespace, limit, follow)")]
    Unknown(String),
}

impl FlowQuery {
    /// Reads URL query parameters (already percent-decoded): `denied` and `follow`
    /// take `1`, `true`, `0`, `false`, or no value (= true).
    pub fn from_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<FlowQuery, QueryError> {
        let flag = |key: &str, value: &str| match value {
            "" | "1" | "true" => Ok(true),
            "0" | "false" => Ok(false),
            _ => Err(QueryError::Flag {
                key: key.into(),
                value: value.into(),
            }),
        };
        let mut q = FlowQuery::default();
        for (key, value) in params {
            match key {
                "since" => {
                    parse_rfc3339(value).ok_or_else(|| QueryError::Since(value.into()))?;
                    q.since = Some(value.into());
                }
                "denied" => q.denied = flag(key, value)?,
                "follow" => q.follow = flag(key, value)?,
                "namespace" => q.namespace = Some(value.into()),
                "limit" => {
                    q.limit = Some(value.parse().map_err(|_| QueryError::Limit(value.into()))?)
                }
                other => return Err(QueryError::Unknown(other.into())),
            }
        }
        Ok(q)
    }

    /// The query string of `GET /flows` (without `?`), percent-encoded.
    pub fn to_query_string(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = &self.since {
            parts.push(format!("since={}", percent_encode(s)));
        }
        if self.denied {
            parts.push("denied=1".into());
        }
        if let Some(ns) = &self.namespace {
            parts.push(format!("namespace={}", percent_encode(ns)));
        }
        if let Some(n) = self.limit {
            parts.push(format!("limit={n}"));
        }
        if self.follow {
            parts.push("follow=1".into());
        }
        parts.join("&")
    }

    /// Whether one record passes the filters (`limit` and `follow` aside).
    pub fn matches(&self, r: &FlowRecord) -> bool {
        if self.denied && r.verdict != "deny" {
            return false;
        }
        if let Some(ns) = &self.namespace
            && !r.namespaces().any(|n| n == ns)
        {
            return false;
        }
        if let Some(since) = self.since.as_deref().and_then(parse_rfc3339) {
            match parse_rfc3339(&r.time) {
                Some(t) if t >= since => {}
                _ => return false,
            }
        }
        true
    }

    /// The matching records of `records` (oldest first), the last `limit` of them.
    pub fn select<'a>(&self, records: impl IntoIterator<Item = &'a FlowRecord>) -> Vec<FlowRecord> {
        let mut out: Vec<FlowRecord> = records
            .into_iter()
            .filter(|r| self.matches(r))
            .cloned()
            .collect();
        if let Some(n) = self.limit {
            out.drain(..out.len().saturating_sub(n));
        }
        out
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An RFC 3339 instant (`2026-12-06T07:00:00Z`, fractions and `±HH:MM` offsets
/// allowed) as milliseconds since the Unix epoch; `None` if it is not one.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 3)];
        millis = frac.parse::<i64>().ok()? * 10i64.pow(3 - frac.len() as u32);
    }
    let offset = match &s[i..] {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            let v = (h * 60 + m) * 60;
            if o.starts_with('-') { -v } else { v }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm), the inverse of `rfc3339`.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset;
    Some(secs * 1000 + millis)
}

/// The last `n` records of the file (and its rotated predecessor), oldest first.
pub fn read_last(path: &Path, n: usize) -> io::Result<Vec<FlowRecord>> {
    let mut all = read_records(path)?;
    all.drain(..all.len().saturating_sub(n));
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record(port: u16) -> FlowRecord {
        FlowRecord {
            time: "2026-12-06T07:00:00.000Z".into(),
            node: "node-2".into(),
            verdict: "deny".into(),
            direction: "ingress".into(),
            src: "default/client".into(),
            dst: "prod/db".into(),
            protocol: "TCP".into(),
            port,
            reason: "isolated".into(),
            policies: vec!["prod/deny-all".into()],
        }
    }

    #[test]
    fn rfc3339_spells_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_540_400_123);
        assert_eq!(rfc3339(t), "2026-12-06T07:00:00.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn records_serialize_with_the_documented_field_names() {
        let v: serde_json::Value = serde_json::to_value(record(80)).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        for k in [
            "time",
            "node",
            "verdict",
            "direction",
            "src",
            "dst",
            "protocol",
            "port",
            "reason",
            "policies",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert_eq!(v["port"], 80);
    }

    #[test]
    fn the_file_rotates_and_never_holds_more_than_twice_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/flows.jsonl");
        let mut f = FlowFile::open(&path, 1000).unwrap();
        for port in 0..200 {
            f.append(&record(port)).unwrap();
        }
        let total =
            fs::metadata(&path).unwrap().len() + fs::metadata(rotated(&path)).unwrap().len();
        assert!(total <= 2000, "{total}");
        let got = read_records(&path).unwrap();
        assert_eq!(got.last().unwrap().port, 199);
        assert!(got.windows(2).all(|w| w[0].port + 1 == w[1].port));
    }

    #[test]
    fn rfc3339_reads_back_what_it_writes_and_honours_offsets() {
        let t = UNIX_EPOCH + Duration::from_millis(1_796_540_400_123);
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(1_796_540_400_123));
        assert_eq!(
            parse_rfc3339("2026-12-06T08:00:00+01:00"),
            parse_rfc3339("2026-12-06T07:00:00Z")
        );
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        for bad in [
            "",
            "yesterday",
            "2026-12-06",
            "2026-13-06T07:00:00Z",
            "2026-12-06T07:00:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_query_filters_by_time_verdict_and_namespace_and_keeps_the_last_limit() {
        let mut records: Vec<FlowRecord> = (0..5).map(record).collect();
        records[0].time = "2026-12-06T06:59:59.000Z".into();
        records[1].src = "other/x".into();
        records[1].dst = "ip:10.0.0.1".into();
        let q = FlowQuery::from_params([
            ("since", "2026-12-06T07:00:00Z"),
            ("denied", "1"),
            ("namespace", "prod"),
            ("limit", "2"),
        ])
        .unwrap();
        let ports: Vec<u16> = q.select(&records).iter().map(|r| r.port).collect();
        assert_eq!(ports, [3, 4]);
        assert_eq!(
            q.to_query_string(),
            "since=2026-12-06T07%3A00%3A00Z&denied=1&namespace=prod&limit=2"
        );
        assert!(FlowQuery::from_params([("since", "now")]).is_err());
        assert!(FlowQuery::from_params([("follow", "yes")]).is_err());
        assert!(FlowQuery::from_params([("verdict", "deny")]).is_err());
        assert!(FlowQuery::from_params([("follow", "")]).unwrap().follow);
    }
}
