//! A whole nf_tables table written over `NETLINK_NETFILTER` without the `nft` program:
//! one NFNL batch that creates the table (or replaces it: `NEWTABLE`, `DELTABLE`,
//! `NEWTABLE`), its chains, its sets and maps with their elements, and its rules,
//! which the kernel commits entirely or not at all.
//!
//! Why: `nft -f` of a realistic node's table (~5,900 elements, ~700 rules) spends most
//! of its time in userspace, parsing the text and turning every interval into its
//! elements, and sends the interval sets' elements twice (once with the set's
//! declaration, once with the `add element` command); the kernel's share is a third.
//!
//! Every message is what nft 1.0.6 sends for the same objects (`nft --debug=mnl -f`),
//! in the order a script of `add chain`, `add set`, `add element` and `add rule`
//! commands sends them, so the kernel holds the same objects with the same handles:
//! - chains: name, a base chain's type, policy accept and hook, a regular chain's
//!   comment as nft's user data;
//! - sets and maps: flags, key type and length (a concatenation's field lengths),
//!   verdict data, an id the batch's rules and elements refer to, and nft's user data
//!   (key byte order and the like), per [`SetForm`];
//! - elements: as [`crate::nft_elements`] encodes them, plus, for an interval set or
//!   map of one field whose first range does not start at zero, the interval end at
//!   zero that nft sends first;
//! - rules: the expressions of [`Expr`] with the registers nft allocates, and the
//!   comment as nft's user data.

use crate::error::NetlinkError;
use crate::nfnl::{NLA_F_NESTED, NLM_F_ACK, NLM_F_REQUEST, attr, message};
use crate::nft_elements::{
    self, ELEMENTS_PER_MESSAGE, Element, Key, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_NFTABLES, NFT_MSG_NEWSETELEM, NFT_SET_ELEM_INTERVAL_END, NFTA_LIST_ELEM,
    NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_SET_ELEM_LIST_SET,
    NFTA_SET_ELEM_LIST_TABLE, NLM_F_CREATE, Verdict, cstr, data_value,
};

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NLM_F_APPEND: u16 = 0x800;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;

const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_CHAIN_USERDATA: u16 = 12;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NF_ACCEPT: u32 = 1;

const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_CONCAT: u16 = 2;
const NFTA_SET_FIELD_LEN: u16 = 1;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_CONCAT: u32 = 0x80;
/// nft's data type of a verdict map's values.
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;

const OP: &str = "writing an nf_tables table";

/// A base chain's hook (policy accept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// `filter` or `nat`.
    pub kind: String,
    /// `NF_INET_*`: 0 prerouting, 1 input, 2 forward, 3 output, 4 postrouting.
    pub hooknum: u32,
    pub priority: i32,
}

/// A chain: a base chain has a hook, a regular one may have a comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub hook: Option<Hook>,
    pub comment: Option<String>,
}

/// The declarations sluice's table uses, each with the attributes and user data nft
/// 1.0.6 sends for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetForm {
    /// `type ipv4_addr;`
    Addr,
    /// `type ipv4_addr; flags interval;`
    AddrIntervals,
    /// `type ipv4_addr . inet_proto . inet_service; flags interval;`
    AddrTuples,
    /// `type mark; flags interval;`
    Marks,
    /// `type mark . inet_proto . inet_service; flags interval;`
    MarkTuples,
    /// `type ifname : verdict;`
    IfaceMap,
    /// `type ifname . ipv4_addr : verdict;`
    IfaceAddrMap,
    /// `type ipv4_addr : verdict; flags interval;`
    AddrIntervalMap,
}

/// libnftnl's set user data as nft 1.0.6 writes it: key byte order (host 1, big
/// endian 2, none for a concatenation), for maps the data byte order and interval
/// flag, and for a concatenation nft's own record of its fields.
const UDATA_BIG_ENDIAN_KEY: &[u8] = &[0, 4, 2, 0, 0, 0];
const UDATA_HOST_KEY: &[u8] = &[0, 4, 1, 0, 0, 0];
const UDATA_CONCAT: &[u8] = &[0, 4, 0, 0, 0, 0, 3, 8, 0, 4, 0x0d, 0, 0, 0, 1, 0];
const UDATA_IFACE_MAP: &[u8] = &[0, 4, 1, 0, 0, 0, 1, 4, 0, 0, 0, 0, 6, 4, 0, 0, 0, 0];
const UDATA_IFACE_ADDR_MAP: &[u8] = &[
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 0x0d, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0,
];
const UDATA_ADDR_MAP: &[u8] = &[0, 4, 2, 0, 0, 0, 1, 4, 0, 0, 0, 0, 6, 4, 0, 0, 0, 0];

struct SetAttrs {
    flags: u32,
    key_type: u32,
    key_len: u32,
    map: bool,
    /// A concatenation's field lengths.
    fields: &'static [u32],
    udata: &'static [u8],
}

impl SetForm {
    fn attrs(self) -> SetAttrs {
        // nft's type ids: ipv4_addr 7, mark 19, inet_proto 12, inet_service 13,
        // ifname 41; a concatenation's id is theirs, 6 bits each.
        let (flags, key_type, key_len, map, fields, udata): (_, _, _, _, &[u32], _) = match self {
            SetForm::Addr => (0, 7, 4, false, &[], UDATA_BIG_ENDIAN_KEY),
            SetForm::AddrIntervals => (NFT_SET_INTERVAL, 7, 4, false, &[], UDATA_BIG_ENDIAN_KEY),
            SetForm::AddrTuples => (
                NFT_SET_INTERVAL | NFT_SET_CONCAT,
                (7 << 12) | (12 << 6) | 13,
                12,
                false,
                &[4, 1, 2],
                UDATA_CONCAT,
            ),
            SetForm::Marks => (NFT_SET_INTERVAL, 19, 4, false, &[], UDATA_HOST_KEY),
            SetForm::MarkTuples => (
                NFT_SET_INTERVAL | NFT_SET_CONCAT,
                (19 << 12) | (12 << 6) | 13,
                12,
                false,
                &[4, 1, 2],
                UDATA_CONCAT,
            ),
            SetForm::IfaceMap => (NFT_SET_MAP, 41, 16, true, &[], UDATA_IFACE_MAP),
            SetForm::IfaceAddrMap => (
                NFT_SET_MAP,
                (41 << 6) | 7,
                20,
                true,
                &[],
                UDATA_IFACE_ADDR_MAP,
            ),
            SetForm::AddrIntervalMap => (
                NFT_SET_MAP | NFT_SET_INTERVAL,
                7,
                4,
                true,
                &[],
                UDATA_ADDR_MAP,
            ),
        };
        SetAttrs {
            flags,
            key_type,
            key_len,
            map,
            fields,
            udata,
        }
    }

    /// An interval set of one field: nft sends the interval end at zero first.
    fn single_field_intervals(self) -> bool {
        matches!(
            self,
            SetForm::AddrIntervals | SetForm::Marks | SetForm::AddrIntervalMap
        )
    }
}

/// A set or map and its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub form: SetForm,
    pub elements: Vec<Element>,
}

/// `NFT_META_*` keys sluice's rules read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKey {
    Mark = 3,
    IifName = 6,
    OifName = 7,
    L4Proto = 16,
}

/// `NFT_PAYLOAD_*` bases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadBase {
    Network = 1,
    Transport = 2,
}

/// `NFT_CMP_*` operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq = 0,
    Neq = 1,
    Lte = 3,
    Gte = 5,
}

/// One expression of a rule, with nft's register numbers (`NFT_REG_*`: 0 the verdict,
/// 1-4 the 16-byte registers, 8 and up the 4-byte ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `meta load KEY => reg`.
    Meta { key: MetaKey, dreg: u32 },
    /// `meta set KEY with reg`.
    MetaSet { key: MetaKey, sreg: u32 },
    /// `payload load LEN @ BASE + OFFSET => reg`.
    Payload {
        base: PayloadBase,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `cmp OP reg DATA`.
    Cmp { op: CmpOp, sreg: u32, data: Vec<u8> },
    /// `bitwise reg = (reg & MASK) ^ XOR`, `len` bytes. `explicit`: written as an `&`
    /// in the rule (nft then sends the boolean operation attribute), not a prefix's or
    /// flag test's implicit mask.
    Bitwise {
        reg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
        explicit: bool,
    },
    /// `byteorder reg = hton(reg, SIZE, LEN)`.
    Hton { reg: u32, size: u32, len: u32 },
    /// `ct load state => reg`.
    CtState { dreg: u32 },
    /// `lookup reg set NAME`, inverted (`!=`) or, for a verdict map, into the verdict.
    Lookup {
        sreg: u32,
        set: String,
        invert: bool,
        verdict_map: bool,
    },
    /// `immediate reg 0 VERDICT`.
    Verdict(Verdict),
    /// `limit rate N/second burst B packets`.
    LimitPerSecond { rate: u64, burst: u32 },
    /// `log prefix P group G`.
    Log { prefix: String, group: u16 },
    /// `masq`.
    Masquerade,
}

/// A rule appended to `chain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub exprs: Vec<Expr>,
    pub comment: Option<String>,
}

/// Everything a table holds, in the order it is created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub chains: Vec<Chain>,
    pub sets: Vec<Set>,
    pub rules: Vec<Rule>,
}

/// Replace table `table` of `family` (`libc::AF_INET` for `ip`) in the calling thread's
/// network namespace with `content`, as one transaction (whether the table exists or
/// not); returns the ruleset generation read right after the commit. On any error the
/// kernel has aborted the whole batch and the previous table is untouched.
pub fn replace_table(family: u8, table: &str, content: &Table) -> Result<u32, NetlinkError> {
    let (batch, acked) = batch(family, table, content)?;
    nft_elements::send_batch(&batch, &acked)
}

/// The batch as bytes and the sequence numbers of the messages to be acked.
fn batch(family: u8, table: &str, content: &Table) -> Result<(Vec<u8>, Vec<u32>), NetlinkError> {
    let mut b = Batch {
        out: Vec::new(),
        seq: 1,
        acked: Vec::new(),
        family,
        table: cstr(table),
    };
    let batch_genmsg = [0u8, 0, 0, NFNL_SUBSYS_NFTABLES as u8];
    message(
        &mut b.out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        b.seq,
        &batch_genmsg,
    );
    // `add table`, `delete table`, `add table`: replaces the table, or creates it.
    for (kind, flags) in [
        (NFT_MSG_NEWTABLE, 0),
        (NFT_MSG_DELTABLE, 0),
        (NFT_MSG_NEWTABLE, 0),
    ] {
        let mut body = b.genmsg();
        attr(&mut body, NFTA_TABLE_NAME, &b.table);
        if kind == NFT_MSG_NEWTABLE {
            attr(&mut body, NFTA_TABLE_FLAGS, &0u32.to_be_bytes());
        }
        b.push(kind, flags, &body);
    }
    for c in &content.chains {
        let mut body = b.genmsg();
        attr(&mut body, NFTA_CHAIN_TABLE, &b.table);
        attr(&mut body, NFTA_CHAIN_NAME, &cstr(&c.name));
        if let Some(h) = &c.hook {
            attr(&mut body, NFTA_CHAIN_TYPE, &cstr(&h.kind));
            attr(&mut body, NFTA_CHAIN_POLICY, &NF_ACCEPT.to_be_bytes());
            let mut hook = Vec::new();
            attr(&mut hook, NFTA_HOOK_HOOKNUM, &h.hooknum.to_be_bytes());
            attr(&mut hook, NFTA_HOOK_PRIORITY, &h.priority.to_be_bytes());
            attr(&mut body, NFTA_CHAIN_HOOK | NLA_F_NESTED, &hook);
        }
        if let Some(comment) = &c.comment {
            attr(&mut body, NFTA_CHAIN_USERDATA, &udata_string(comment)?);
        }
        b.push(NFT_MSG_NEWCHAIN, NLM_F_CREATE, &body);
    }
    let mut set_ids = Vec::new();
    for (i, s) in content.sets.iter().enumerate() {
        let id = i as u32 + 1;
        set_ids.push((s.name.as_str(), id));
        let a = s.form.attrs();
        let mut body = b.genmsg();
        attr(&mut body, NFTA_SET_TABLE, &b.table);
        attr(&mut body, NFTA_SET_NAME, &cstr(&s.name));
        attr(&mut body, NFTA_SET_FLAGS, &a.flags.to_be_bytes());
        attr(&mut body, NFTA_SET_KEY_TYPE, &a.key_type.to_be_bytes());
        attr(&mut body, NFTA_SET_KEY_LEN, &a.key_len.to_be_bytes());
        if a.map {
            attr(
                &mut body,
                NFTA_SET_DATA_TYPE,
                &NFT_DATA_VERDICT.to_be_bytes(),
            );
            attr(&mut body, NFTA_SET_DATA_LEN, &0u32.to_be_bytes());
        }
        attr(&mut body, NFTA_SET_ID, &id.to_be_bytes());
        if !a.fields.is_empty() {
            let mut concat = Vec::new();
            for len in a.fields {
                let mut field = Vec::new();
                attr(&mut field, NFTA_SET_FIELD_LEN, &len.to_be_bytes());
                attr(&mut concat, NFTA_LIST_ELEM | NLA_F_NESTED, &field);
            }
            let mut desc = Vec::new();
            attr(&mut desc, NFTA_SET_DESC_CONCAT | NLA_F_NESTED, &concat);
            attr(&mut body, NFTA_SET_DESC | NLA_F_NESTED, &desc);
        }
        attr(&mut body, NFTA_SET_USERDATA, a.udata);
        b.push(NFT_MSG_NEWSET, NLM_F_CREATE, &body);
        b.elements(s, id)?;
    }
    for r in &content.rules {
        let mut body = b.genmsg();
        attr(&mut body, NFTA_RULE_TABLE, &b.table);
        attr(&mut body, NFTA_RULE_CHAIN, &cstr(&r.chain));
        let mut exprs = Vec::new();
        for e in &r.exprs {
            expr(&mut exprs, e, &set_ids)?;
        }
        attr(&mut body, NFTA_RULE_EXPRESSIONS | NLA_F_NESTED, &exprs);
        if let Some(comment) = &r.comment {
            attr(&mut body, NFTA_RULE_USERDATA, &udata_string(comment)?);
        }
        b.push(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, &body);
    }
    b.seq += 1;
    message(
        &mut b.out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        b.seq,
        &batch_genmsg,
    );
    Ok((b.out, b.acked))
}

struct Batch {
    out: Vec<u8>,
    seq: u32,
    acked: Vec<u32>,
    family: u8,
    table: Vec<u8>,
}

impl Batch {
    /// `struct nfgenmsg`: the family, version 0, resource id 0.
    fn genmsg(&self) -> Vec<u8> {
        vec![self.family, 0, 0, 0]
    }

    /// Append one nf_tables message that must be acked.
    fn push(&mut self, kind: u16, flags: u16, body: &[u8]) {
        self.seq += 1;
        self.acked.push(self.seq);
        message(
            &mut self.out,
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            self.seq,
            body,
        );
    }

    /// The elements of the set just declared with `id`.
    fn elements(&mut self, s: &Set, id: u32) -> Result<(), NetlinkError> {
        if s.elements.is_empty() {
            return Ok(());
        }
        let mut leading_end = None;
        if s.form.single_field_intervals() {
            let starts_at_zero = s.elements.iter().any(|e| match e.key {
                Key::AddrRange(a, _) => u32::from(a) == 0,
                Key::MarkRange(a, _) => a == 0,
                _ => false,
            });
            if !starts_at_zero {
                let mut one = Vec::new();
                attr(
                    &mut one,
                    NFTA_SET_ELEM_FLAGS,
                    &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
                );
                data_value(&mut one, NFTA_SET_ELEM_KEY, &[0; 4]);
                let mut list = Vec::new();
                attr(&mut list, NFTA_LIST_ELEM | NLA_F_NESTED, &one);
                leading_end = Some(list);
            }
        }
        for (i, chunk) in s.elements.chunks(ELEMENTS_PER_MESSAGE).enumerate() {
            let mut list = if i == 0 {
                leading_end.take().unwrap_or_default()
            } else {
                Vec::new()
            };
            for e in chunk {
                nft_elements::encode_element(&mut list, e, true)?;
            }
            let mut body = self.genmsg();
            attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &self.table);
            attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(&s.name));
            attr(&mut body, NFTA_SET_ELEM_LIST_SET_ID, &id.to_be_bytes());
            attr(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, &list);
            self.push(NFT_MSG_NEWSETELEM, NLM_F_CREATE, &body);
        }
        Ok(())
    }
}

/// libnftnl's comment user data (type 0, length, the string and its NUL), as chains
/// and rules carry it.
fn udata_string(s: &str) -> Result<Vec<u8>, NetlinkError> {
    let len = u8::try_from(s.len() + 1).map_err(|_| NetlinkError::Decode {
        op: OP.into(),
        detail: format!("comment {s:?} is longer than 254 bytes"),
    })?;
    let mut v = vec![0, len];
    v.extend_from_slice(&cstr(s));
    Ok(v)
}

fn u32_attr(out: &mut Vec<u8>, kind: u16, v: u32) {
    attr(out, kind, &v.to_be_bytes());
}

/// One expression: `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { … } }`.
fn expr(out: &mut Vec<u8>, e: &Expr, set_ids: &[(&str, u32)]) -> Result<(), NetlinkError> {
    let mut d = Vec::new();
    let name = match e {
        Expr::Meta { key, dreg } => {
            u32_attr(&mut d, 2, *key as u32);
            u32_attr(&mut d, 1, *dreg);
            "meta"
        }
        Expr::MetaSet { key, sreg } => {
            u32_attr(&mut d, 2, *key as u32);
            u32_attr(&mut d, 3, *sreg);
            "meta"
        }
        Expr::Payload {
            base,
            offset,
            len,
            dreg,
        } => {
            u32_attr(&mut d, 1, *dreg);
            u32_attr(&mut d, 2, *base as u32);
            u32_attr(&mut d, 3, *offset);
            u32_attr(&mut d, 4, *len);
            "payload"
        }
        Expr::Cmp { op, sreg, data } => {
            u32_attr(&mut d, 1, *sreg);
            u32_attr(&mut d, 2, *op as u32);
            data_value(&mut d, 3, data);
            "cmp"
        }
        Expr::Bitwise {
            reg,
            len,
            mask,
            xor,
            explicit,
        } => {
            u32_attr(&mut d, 1, *reg);
            u32_attr(&mut d, 2, *reg);
            if *explicit {
                // NFT_BITWISE_BOOL.
                u32_attr(&mut d, 6, 0);
            }
            u32_attr(&mut d, 3, *len);
            data_value(&mut d, 4, mask);
            data_value(&mut d, 5, xor);
            "bitwise"
        }
        Expr::Hton { reg, size, len } => {
            u32_attr(&mut d, 1, *reg);
            u32_attr(&mut d, 2, *reg);
            // NFT_BYTEORDER_HTON.
            u32_attr(&mut d, 3, 1);
            u32_attr(&mut d, 4, *len);
            u32_attr(&mut d, 5, *size);
            "byteorder"
        }
        Expr::CtState { dreg } => {
            // NFT_CT_STATE.
            u32_attr(&mut d, 2, 0);
            u32_attr(&mut d, 1, *dreg);
            "ct"
        }
        Expr::Lookup {
            sreg,
            set,
            invert,
            verdict_map,
        } => {
            let id = set_ids
                .iter()
                .find(|(n, _)| n == set)
                .map(|(_, id)| *id)
                .ok_or_else(|| NetlinkError::Decode {
                    op: OP.into(),
                    detail: format!("a rule looks up {set:?}, which the table does not declare"),
                })?;
            u32_attr(&mut d, 2, *sreg);
            if *verdict_map {
                u32_attr(&mut d, 3, 0);
            }
            attr(&mut d, 1, &cstr(set));
            u32_attr(&mut d, 4, id);
            if *invert {
                // NFT_LOOKUP_F_INV.
                u32_attr(&mut d, 5, 1);
            }
            "lookup"
        }
        Expr::Verdict(v) => {
            u32_attr(&mut d, 1, 0);
            let mut data = Vec::new();
            nft_elements::verdict_data(&mut data, v);
            attr(&mut d, 2 | NLA_F_NESTED, &data);
            "immediate"
        }
        Expr::LimitPerSecond { rate, burst } => {
            attr(&mut d, 1, &rate.to_be_bytes());
            attr(&mut d, 2, &1u64.to_be_bytes());
            u32_attr(&mut d, 3, *burst);
            // NFT_LIMIT_PKTS, no flags.
            u32_attr(&mut d, 4, 0);
            u32_attr(&mut d, 5, 0);
            "limit"
        }
        Expr::Log { prefix, group } => {
            attr(&mut d, 2, &cstr(prefix));
            attr(&mut d, 1, &group.to_be_bytes());
            "log"
        }
        Expr::Masquerade => "masq",
    };
    let mut one = Vec::new();
    attr(&mut one, NFTA_EXPR_NAME, &cstr(name));
    attr(&mut one, NFTA_EXPR_DATA | NLA_F_NESTED, &d);
    attr(out, NFTA_LIST_ELEM | NLA_F_NESTED, &one);
    Ok(())
}
