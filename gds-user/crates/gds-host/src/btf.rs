//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`, and a module's split BTF
//! in `/sys/kernel/btf/<module>` on top of it).
//!
//! aya has no CO-RE for Rust programs, so gds resolves the struct offsets its programs need at
//! load time and hands them over as read-only globals. This reader knows just enough of the
//! format (include/uapi/linux/btf.h) for that: named structs and their members (through
//! anonymous structs and unions), typedefs and the function prototypes behind tracepoints.

use std::path::Path;

use thiserror::Error;

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Where a loaded module's BTF appears (`CONFIG_DEBUG_INFO_BTF_MODULES`).
pub const MODULE_BTF_DIR: &str = "/sys/kernel/btf";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read BTF from {path}: {source} (the kernel needs CONFIG_DEBUG_INFO_BTF)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("BTF member {strukt}.{member} is a bitfield; gds reads whole fields only")]
    Bitfield { strukt: String, member: String },
    #[error("BTF has no tracepoint prototype btf_trace_{0}")]
    NoTracepoint(String),
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One type record, decoded from the raw type section when it is looked at: the agent holds
/// vmlinux's BTF through start-up, and a decoded copy of every type (members, parameters and
/// enumerators in vectors of their own, names as owned strings in a hash map) took 24 MiB of
/// heap for a 5.4 MiB blob; the raw bytes and two indexes of `u32` take 6.
#[derive(Debug, Clone, Copy)]
struct Type {
    name: u32,
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    /// size for INT/STRUCT/UNION/ENUM, referenced type for PTR/TYPEDEF/modifiers/FUNC_PROTO.
    size_or_type: u32,
    /// Where the kind's trailing data (members, parameters, enumerators) starts in `raw`.
    data: usize,
}

/// A struct or union member.
#[derive(Debug, Clone, Copy)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
    bitfield: bool,
}

/// Parsed BTF: the blob(s) as read, every type's position by id (id 0 is `void`), and a name
/// index for the kinds gds looks up.
pub struct Btf {
    /// vmlinux's BTF, then a module's split BTF when there is one.
    raw: Vec<u8>,
    /// The string sections in `raw`: a string offset at or past the first's length continues
    /// into the second (split BTF).
    strings: Vec<std::ops::Range<usize>>,
    /// Offset in `raw` of each type's record, by type id; id 0 (`void`) has none.
    types: Vec<u32>,
    /// Ids of the named types of the kinds gds looks up by name, sorted by (kind, name, id).
    by_name: Vec<u32>,
}

fn u32_at(data: &[u8], off: usize) -> Result<u32, BtfError> {
    data.get(off..off + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

fn read(path: &Path) -> Result<Vec<u8>, BtfError> {
    std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The type and string sections of the BTF blob at `data[at..]` (header checked), as ranges
/// of `data`.
fn sections(
    data: &[u8],
    at: usize,
) -> Result<(std::ops::Range<usize>, std::ops::Range<usize>), BtfError> {
    let blob = &data[at..];
    if blob.len() < 24 || blob[0..2] != [0x9f, 0xeb] {
        return Err(BtfError::Malformed(
            "bad magic (only little-endian BTF is supported)",
        ));
    }
    let hdr_len = u32_at(blob, 4)? as usize;
    let type_off = u32_at(blob, 8)? as usize;
    let type_len = u32_at(blob, 12)? as usize;
    let str_off = u32_at(blob, 16)? as usize;
    let str_len = u32_at(blob, 20)? as usize;
    let tstart = hdr_len
        .checked_add(type_off)
        .ok_or(BtfError::Malformed("type offset"))?;
    let tend = tstart
        .checked_add(type_len)
        .ok_or(BtfError::Malformed("type length"))?;
    let sstart = hdr_len
        .checked_add(str_off)
        .ok_or(BtfError::Malformed("string offset"))?;
    let send = sstart
        .checked_add(str_len)
        .ok_or(BtfError::Malformed("string length"))?;
    if tstart > tend || tend > blob.len() {
        return Err(BtfError::Malformed("type section out of bounds"));
    }
    if sstart > send || send > blob.len() {
        return Err(BtfError::Malformed("string section out of bounds"));
    }
    Ok((at + tstart..at + tend, at + sstart..at + send))
}

/// Size of the data after a type's 12-byte header, by kind.
fn trailing_len(kind: u32, vlen: usize) -> Result<usize, BtfError> {
    Ok(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
        KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
        0..=19 => 0,
        _ => return Err(BtfError::Malformed("unknown type kind")),
    })
}

/// Appends the position of every type of the type section `range` of `raw` to `types` (ids
/// continue from `types.len()`); checks that each record lies within the section.
fn index_types(
    raw: &[u8],
    range: std::ops::Range<usize>,
    types: &mut Vec<u32>,
) -> Result<(), BtfError> {
    let mut off = range.start;
    while off < range.end {
        let info = u32_at(raw, off + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let end = off + 12 + trailing_len(kind, vlen)?;
        if end > range.end {
            return Err(BtfError::Malformed("truncated"));
        }
        types.push(u32::try_from(off).map_err(|_| BtfError::Malformed("BTF over 4 GiB"))?);
        off = end;
    }
    Ok(())
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys() -> Result<Btf, BtfError> {
        Btf::from_file(Path::new(VMLINUX_BTF))
    }

    /// The running kernel's BTF with module `module`'s split BTF on top: type ids and string
    /// offsets of a module continue vmlinux's, so its structs can name vmlinux types.
    pub fn from_sys_module(module: &str) -> Result<Btf, BtfError> {
        let mut raw = read(Path::new(VMLINUX_BTF))?;
        let base_len = raw.len();
        raw.extend_from_slice(&read(&Path::new(MODULE_BTF_DIR).join(module))?);
        Btf::from_raw(raw, Some(base_len))
    }

    pub fn from_file(path: &Path) -> Result<Btf, BtfError> {
        Btf::from_raw(read(path)?, None)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        Btf::from_raw(data.to_vec(), None)
    }

    /// `split` (a module's BTF) on top of `base` (vmlinux's). In split BTF the first type id
    /// is one past the base's last, and a string offset at or past the base's string section
    /// length points into the split's own strings.
    pub fn parse_split(base: &[u8], split: &[u8]) -> Result<Btf, BtfError> {
        let mut raw = Vec::with_capacity(base.len() + split.len());
        raw.extend_from_slice(base);
        raw.extend_from_slice(split);
        Btf::from_raw(raw, Some(base.len()))
    }

    /// `raw`: one BTF blob, or (`split_at`) a base blob followed by a split one.
    fn from_raw(raw: Vec<u8>, split_at: Option<usize>) -> Result<Btf, BtfError> {
        let mut types = vec![0u32];
        let mut strings = Vec::new();
        for at in std::iter::once(0).chain(split_at) {
            if at > raw.len() {
                return Err(BtfError::Malformed("truncated"));
            }
            let (tdata, strs) = sections(&raw, at)?;
            index_types(&raw, tdata, &mut types)?;
            strings.push(strs);
        }
        types.shrink_to_fit();
        let mut btf = Btf {
            raw,
            strings,
            types,
            by_name: Vec::new(),
        };
        let mut by_name: Vec<u32> = (1..btf.types.len() as u32)
            .filter(|&id| {
                btf.ty(id).is_some_and(|t| {
                    matches!(
                        t.kind,
                        KIND_STRUCT | KIND_UNION | KIND_TYPEDEF | KIND_ENUM | KIND_FUNC
                    ) && t.name != 0
                })
            })
            .collect();
        // Stable: of several types of one kind and name, the lowest id comes first and is
        // the one found.
        by_name.sort_by(|&a, &b| btf.name_key(a).cmp(&btf.name_key(b)));
        by_name.shrink_to_fit();
        btf.by_name = by_name;
        Ok(btf)
    }

    /// (kind, name) of type `id`, what [`Self::by_name`] is sorted by.
    fn name_key(&self, id: u32) -> (u32, &str) {
        self.ty(id).map_or((0, ""), |t| (t.kind, self.str(t.name)))
    }

    /// The lowest id of a type of `kind` named `name`.
    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        let i = self
            .by_name
            .partition_point(|&id| self.name_key(id) < (kind, name));
        let id = *self.by_name.get(i)?;
        (self.name_key(id) == (kind, name)).then_some(id)
    }

    fn str(&self, off: u32) -> &str {
        let mut off = off as usize;
        let mut rest: &[u8] = &[];
        for r in &self.strings {
            if off < r.len() {
                rest = &self.raw[r.start + off..r.end];
                break;
            }
            off -= r.len();
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn ty(&self, id: u32) -> Option<Type> {
        let off = *self.types.get(id as usize)? as usize;
        if id == 0 {
            return Some(Type {
                name: 0,
                kind: 0,
                kind_flag: false,
                vlen: 0,
                size_or_type: 0,
                data: 0,
            });
        }
        let info = u32_at(&self.raw, off + 4).ok()?;
        Some(Type {
            name: u32_at(&self.raw, off).ok()?,
            kind: (info >> 24) & 0x1f,
            kind_flag: info >> 31 == 1,
            vlen: (info & 0xffff) as usize,
            size_or_type: u32_at(&self.raw, off + 8).ok()?,
            data: off + 12,
        })
    }

    /// The members of a struct or union (none for other kinds).
    fn members(&self, t: Type) -> impl Iterator<Item = Member> + '_ {
        let n = if matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            t.vlen
        } else {
            0
        };
        (0..n).filter_map(move |i| {
            let m = t.data + i * 12;
            let raw = u32_at(&self.raw, m + 8).ok()?;
            let (bit_offset, bitfield) = if t.kind_flag {
                (raw & 0xff_ffff, raw >> 24 != 0)
            } else {
                (raw, false)
            };
            Some(Member {
                name: u32_at(&self.raw, m).ok()?,
                ty: u32_at(&self.raw, m + 4).ok()?,
                bit_offset,
                bitfield,
            })
        })
    }

    /// Follows typedefs and modifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.ty(id) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    fn struct_id(&self, name: &str) -> Option<u32> {
        self.find(KIND_STRUCT, name)
            .or_else(|| self.find(KIND_UNION, name))
    }

    pub fn has_struct(&self, name: &str) -> bool {
        self.struct_id(name).is_some()
    }

    /// Finds `member` in struct/union `id`, descending into anonymous members; returns the bit
    /// offset from the start of `id` and the member.
    fn find_member(&self, id: u32, member: &str, depth: u32) -> Option<(u32, Member)> {
        if depth > 8 {
            return None;
        }
        let t = self.ty(self.resolve(id))?;
        if let Some(m) = self.members(t).find(|m| self.str(m.name) == member) {
            return Some((m.bit_offset, m));
        }
        for m in self.members(t).filter(|m| m.name == 0) {
            if let Some((off, found)) = self.find_member(m.ty, member, depth + 1) {
                return Some((m.bit_offset + off, found));
            }
        }
        None
    }

    /// Byte offset of `path` (e.g. `["cqe", "user_data"]`) inside `struct strukt`.
    pub fn member_offset(&self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut id = self
            .struct_id(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let mut bits = 0u32;
        for name in path {
            let (off, m) = self
                .find_member(id, name, 0)
                .ok_or_else(|| BtfError::NoMember {
                    strukt: strukt.to_owned(),
                    member: path.join("."),
                })?;
            if m.bitfield || off % 8 != 0 {
                return Err(BtfError::Bitfield {
                    strukt: strukt.to_owned(),
                    member: path.join("."),
                });
            }
            bits += off;
            id = m.ty;
        }
        Ok(bits / 8)
    }

    /// `sizeof(struct name)`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let id = self
            .struct_id(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        Ok(self.ty(id).map(|t| t.size_or_type).unwrap_or(0))
    }

    /// Size in bytes of the member at `path`, following typedefs (pointers are 8).
    pub fn member_size(&self, strukt: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut id = self
            .struct_id(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        for name in path {
            let (_, m) = self
                .find_member(id, name, 0)
                .ok_or_else(|| BtfError::NoMember {
                    strukt: strukt.to_owned(),
                    member: path.join("."),
                })?;
            id = m.ty;
        }
        let t = self
            .ty(self.resolve(id))
            .ok_or(BtfError::Malformed("dangling type id"))?;
        Ok(match t.kind {
            KIND_PTR => 8,
            _ => t.size_or_type,
        })
    }

    /// Parameter type names of tracepoint `tp` as the BTF (raw) tracepoint sees them, without
    /// the leading `void *__data`: e.g. `["struct io_ring_ctx *", "void *", "struct io_uring_cqe *"]`.
    pub fn tracepoint_params(&self, tp: &str) -> Result<Vec<String>, BtfError> {
        let id = self
            .tracepoint_id(tp)
            .ok_or_else(|| BtfError::NoTracepoint(tp.to_owned()))?;
        let ptr = self
            .ty(self.resolve(id))
            .ok_or(BtfError::Malformed("dangling typedef"))?;
        let proto = self
            .ty(ptr.size_or_type)
            .ok_or(BtfError::Malformed("dangling pointer"))?;
        if proto.kind != KIND_FUNC_PROTO {
            return Err(BtfError::Malformed("btf_trace_* is not a function pointer"));
        }
        Ok((1..proto.vlen)
            .filter_map(|i| u32_at(&self.raw, proto.data + i * 8 + 4).ok())
            .map(|p| self.type_name(p))
            .collect())
    }

    /// Enumerators of `enum name` (e.g. `io_uring_op`), as (name, value).
    pub fn enum_values(&self, name: &str) -> Option<Vec<(String, i64)>> {
        let t = self.ty(self.find(KIND_ENUM, name)?)?;
        (0..t.vlen)
            .map(|i| {
                let e = t.data + i * 8;
                let n = u32_at(&self.raw, e).ok()?;
                let v = u32_at(&self.raw, e + 4).ok()? as i32 as i64;
                Some((self.str(n).to_owned(), v))
            })
            .collect()
    }

    /// The BTF type id of kernel function `name` (what an fentry program attaches to).
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.find(KIND_FUNC, name)
    }

    /// The BTF type id of tracepoint `tp`'s `btf_trace_<tp>` typedef (what a BTF tracepoint
    /// program attaches to).
    pub fn tracepoint_id(&self, tp: &str) -> Option<u32> {
        self.find(KIND_TYPEDEF, &format!("btf_trace_{tp}"))
    }

    /// Whether the tracepoint exists in BTF.
    pub fn has_tracepoint(&self, tp: &str) -> bool {
        self.tracepoint_id(tp).is_some()
    }

    /// A C-like name for a type (enough to tell prototypes apart).
    pub fn type_name(&self, id: u32) -> String {
        let Some(t) = self.ty(id) else {
            return "?".into();
        };
        match t.kind {
            0 => "void".into(),
            KIND_PTR => format!("{} *", self.type_name(t.size_or_type)),
            KIND_CONST => format!("const {}", self.type_name(t.size_or_type)),
            KIND_VOLATILE | KIND_RESTRICT | KIND_TYPE_TAG => self.type_name(t.size_or_type),
            KIND_STRUCT => format!("struct {}", self.str(t.name)),
            KIND_UNION => format!("union {}", self.str(t.name)),
            KIND_ENUM | KIND_ENUM64 => format!("enum {}", self.str(t.name)),
            _ => self.str(t.name).to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF must resolve what the io_uring programs read. Every kernel this
    /// project supports (6.1 … 6.18) has these members.
    #[test]
    fn vmlinux_io_kiocb_offsets() {
        let btf = Btf::from_sys().expect("this machine has BTF");
        let opcode = btf.member_offset("io_kiocb", &["opcode"]).unwrap();
        let ctx = btf.member_offset("io_kiocb", &["ctx"]).unwrap();
        let ud = btf
            .member_offset("io_kiocb", &["cqe", "user_data"])
            .unwrap();
        assert_eq!(btf.member_size("io_kiocb", &["opcode"]).unwrap(), 1);
        assert_eq!(btf.member_size("io_kiocb", &["ctx"]).unwrap(), 8);
        assert_eq!(
            btf.member_size("io_kiocb", &["cqe", "user_data"]).unwrap(),
            8
        );
        assert!(opcode != ctx && ctx != ud && opcode < 256 && ctx < 256 && ud < 256);
        // UAPI struct, layout fixed: user_data 0, res 8, flags 12.
        assert_eq!(btf.member_offset("io_uring_cqe", &["res"]).unwrap(), 8);
        assert_eq!(
            btf.member_offset("io_uring_sqe", &["user_data"]).unwrap(),
            32
        );
    }

    #[test]
    fn vmlinux_tracepoint_prototypes() {
        let btf = Btf::from_sys().unwrap();
        let complete = btf.tracepoint_params("io_uring_complete").unwrap();
        assert!(complete.len() == 3 || complete.len() == 7, "{complete:?}");
        assert!(btf.has_tracepoint("block_rq_issue"));
        assert!(matches!(
            btf.tracepoint_params("no_such_tp"),
            Err(BtfError::NoTracepoint(_))
        ));
        assert!(matches!(
            btf.member_offset("io_kiocb", &["nope"]),
            Err(BtfError::NoMember { .. })
        ));
    }

    /// A BTF blob: header, type section (raw words), string section.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let tlen = (types.len() * 4) as u32;
        let mut b = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, tlen, tlen, strings.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        for t in types {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b.extend_from_slice(strings);
        b
    }

    /// Split BTF as a module's is laid out: its first type id follows the base's last, its
    /// string offsets continue the base's string section, and its structs name base types.
    #[test]
    fn split_btf_continues_ids_and_strings() {
        // Base: [1] int "int" (4 bytes), [2] struct "request" { int q @0 } size 8.
        let base_strings = b"\0int\0request\0q\0";
        let base = blob(
            &[
                1,
                KIND_INT << 24,
                4,
                32, // [1] int: name "int"@1, size 4, encoding word
                5,
                (KIND_STRUCT << 24) | 1,
                8,
                13,
                1,
                0, // [2] struct request { q: [1] @0 }
            ],
            base_strings,
        );
        // Split: [3] struct "nvme_request" { struct request r @0; int status @ bit 160 }.
        // Its string offsets start at base_strings.len() (15): "nvme_request" @15, "r" @28,
        // "status" @30; type ids 1 and 2 are the base's.
        let split_strings = b"nvme_request\0r\0status\0";
        let off = base_strings.len() as u32;
        let split = blob(
            &[
                off,
                (KIND_STRUCT << 24) | 2,
                24,
                off + 13,
                2,
                0, // r: struct request (base id 2) @0
                off + 15,
                1,
                160, // status: int (base id 1) @ byte 20
            ],
            split_strings,
        );
        let btf = Btf::parse_split(&base, &split).unwrap();
        assert_eq!(btf.member_offset("nvme_request", &["status"]).unwrap(), 20);
        assert_eq!(btf.member_offset("nvme_request", &["r", "q"]).unwrap(), 0);
        assert_eq!(btf.struct_size("nvme_request").unwrap(), 24);
        assert_eq!(btf.member_size("nvme_request", &["status"]).unwrap(), 4);
        // The base alone does not know it; a truncated split is an error, not a panic.
        assert!(
            Btf::parse(&base)
                .unwrap()
                .member_offset("nvme_request", &["status"])
                .is_err()
        );
        assert!(Btf::parse_split(&base, &split[..30]).is_err());
    }

    /// The agent holds vmlinux's BTF through its start: the parse must stay near the blob's
    /// own size (decoding every type into vectors and owned names took 4.5 times it).
    #[test]
    fn parsed_vmlinux_stays_near_the_blob_size() {
        let btf = Btf::from_sys().unwrap();
        let held = btf.raw.capacity() + 4 * (btf.types.capacity() + btf.by_name.capacity());
        assert!(
            held < btf.raw.len() * 5 / 4,
            "{held} bytes held for {} bytes of BTF",
            btf.raw.len()
        );
        // Every kind gds looks up by name is found, and the first of duplicates wins.
        assert!(btf.func_id("vfs_read").is_some());
        assert!(btf.enum_values("io_uring_op").is_some_and(|v| v.len() > 40));
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0]).is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 1000, 0, 10] {
            hdr.extend_from_slice(&v.to_le_bytes());
        }
        assert!(matches!(Btf::parse(&hdr), Err(BtfError::Malformed(_))));
        // Every truncation of real BTF is rejected or parsed without panicking.
        let real = std::fs::read(VMLINUX_BTF).unwrap();
        for cut in [25, 100, 4096, real.len() / 2] {
            let _ = Btf::parse(&real[..cut]);
        }
    }
}
