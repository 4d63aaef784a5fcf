//! The XDP side of the AF_XDP driver: load `bpf/xsk_redirect.c` (compiled by build.rs) with raw
//! `bpf(2)` calls, and attach it to an interface through a BPF link.
//!
//! No libbpf or aya: the program is six instructions with one map reference, so the loader
//! only has to find the `xdp` section in the ELF object, create the XSKMAP itself, and patch
//! the `ld_imm64` the relocation names to carry the map's fd. The map definition in the object
//! (BTF-style `.maps`) is not read.
//!
//! Attaching goes through `BPF_LINK_CREATE` rather than netlink `IFLA_XDP`: the program stays
//! attached exactly as long as the link fd is open, so closing it (drop, or the process dying)
//! detaches, and an interface that already has an XDP program is refused (EBUSY) instead of
//! having it replaced behind someone's back.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::IoError;

// Kernel ABI (include/uapi/linux/bpf.h, if_link.h).
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// Opcode of the first half of a 64-bit immediate load (BPF_LD | BPF_IMM | BPF_DW).
const LD_IMM64: u8 = 0x18;

/// The compiled program, if clang was there when dva-io was built.
#[cfg(dva_xdp_built)]
pub(crate) const XDP_OBJECT: Option<&[u8]> =
    Some(include_bytes!(concat!(env!("OUT_DIR"), "/xsk_redirect.o")));
#[cfg(not(dva_xdp_built))]
pub(crate) const XDP_OBJECT: Option<&[u8]> = None;

const PROG_SECTION: &str = "xdp";
const MAP_SYMBOL: &str = "xsks_map";
/// XSKMAP slots: one per receive queue the program may see.
const XSKMAP_ENTRIES: u32 = 64;
/// Receive queues one program (and so one interface) can serve.
pub(crate) const MAX_QUEUES: usize = XSKMAP_ENTRIES as usize;

/// How the program is attached to the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver's receive path (XDP_FLAGS_DRV_MODE), before an skb exists.
    Native,
    /// After the skb is built (XDP_FLAGS_SKB_MODE): works on every device, costs the skb.
    Generic,
}

impl XdpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }

    fn flags(self) -> u32 {
        match self {
            XdpMode::Native => XDP_FLAGS_DRV_MODE,
            XdpMode::Generic => XDP_FLAGS_SKB_MODE,
        }
    }
}

/// The program attached to one interface, with its XSKMAP. Detached when dropped (the link fd
/// closes first, then the program and the map).
pub(crate) struct XdpProgram {
    // Field order is drop order: the link first, so the program is off the interface before
    // the map it redirects through goes away.
    _link: OwnedFd,
    _prog: OwnedFd,
    _map: OwnedFd,
    mode: XdpMode,
}

impl XdpProgram {
    /// Load the program with a fresh XSKMAP in which each `(queue, socket)` of `sockets` maps
    /// the queue to its AF_XDP socket, and attach it to `ifindex` in the first of `modes` the
    /// kernel accepts.
    pub(crate) fn attach(
        ifname: &str,
        ifindex: u32,
        sockets: &[(u32, RawFd)],
        modes: &[XdpMode],
    ) -> Result<XdpProgram, IoError> {
        let object = XDP_OBJECT.ok_or(IoError::XdpNotBuilt)?;
        let prog = ProgramImage::parse(object).map_err(|reason| IoError::Xdp {
            on: ifname.into(),
            reason: format!("bad XDP object built into dva-io: {reason}"),
        })?;
        let err = |call| move |e| IoError::syscall(call, ifname, e);
        let map = map_create_xskmap().map_err(err("bpf BPF_MAP_CREATE XSKMAP"))?;
        for &(queue, xsk_fd) in sockets {
            let fd = u32::try_from(xsk_fd).map_err(|_| IoError::Xdp {
                on: ifname.into(),
                reason: format!("negative socket fd {xsk_fd}"),
            })?;
            map_update(&map, queue, fd).map_err(err("bpf BPF_MAP_UPDATE_ELEM XSKMAP"))?;
        }
        let insns = prog.patched(map.as_raw_fd());
        let prog_fd = prog_load(&insns, &prog.license).map_err(|(e, log)| IoError::Xdp {
            on: ifname.into(),
            reason: format!("bpf BPF_PROG_LOAD: {e}; verifier: {log}"),
        })?;
        let mut last = None;
        for &mode in modes {
            match link_create(&prog_fd, ifindex, mode.flags()) {
                Ok(link) => {
                    return Ok(XdpProgram {
                        _link: link,
                        _prog: prog_fd,
                        _map: map,
                        mode,
                    })
                }
                Err(e) => last = Some((mode, e)),
            }
        }
        let (mode, e) = last.ok_or(IoError::Xdp {
            on: ifname.into(),
            reason: "no XDP attach mode allowed".into(),
        })?;
        Err(IoError::Xdp {
            on: ifname.into(),
            reason: format!("bpf BPF_LINK_CREATE ({} XDP): {e}", mode.as_str()),
        })
    }

    pub(crate) fn mode(&self) -> XdpMode {
        self.mode
    }
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` prefix of `union bpf_attr` of exactly
    // the size we pass; the kernel zero-extends a shorter attr and writes back at most that many
    // bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn bpf_fd<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: for the commands that create objects, bpf(2) returns a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

fn map_create_xskmap() -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_XSKMAP,
        key_size: 4,
        value_size: 4,
        max_entries: XSKMAP_ENTRIES,
        ..Default::default()
    };
    attr.map_name[..8].copy_from_slice(b"dva_xsks");
    bpf_fd(BPF_MAP_CREATE, &mut attr)
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn map_update(map: &OwnedFd, key: u32, value: u32) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &value as *const u32 as u64,
        flags: 0, // BPF_ANY
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Load the program; on failure, load it again with the verifier log on, so the error says why.
fn prog_load(insns: &[u64], license: &[u8]) -> Result<OwnedFd, (io::Error, String)> {
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    attr.prog_name[..12].copy_from_slice(b"xsk_redirect");
    match bpf_fd(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            let mut log = vec![0u8; 64 << 10];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf_fd(BPF_PROG_LOAD, &mut attr);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            // The verifier's verdict is at the end of its log.
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err((first, tail.join(" | ")))
        }
    }
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn link_create(prog: &OwnedFd, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags,
    };
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// The program section of the object, with the instructions that load the map's address.
#[derive(Debug)]
struct ProgramImage {
    insns: Vec<u64>,
    /// Indices of the `ld_imm64` instructions that refer to the XSKMAP.
    map_refs: Vec<usize>,
    /// NUL-terminated license string (the kernel wants a GPL-compatible one for the helpers).
    license: Vec<u8>,
}

impl ProgramImage {
    /// Pick the `xdp` section, its relocations and the license out of an ELF64 little-endian
    /// BPF object. Only what clang emits for bpf/xsk_redirect.c is supported: every relocation
    /// of the section must name the XSKMAP.
    fn parse(obj: &[u8]) -> Result<ProgramImage, String> {
        let elf = Elf::new(obj)?;
        let (prog_idx, prog) = elf
            .section_named(PROG_SECTION)?
            .ok_or_else(|| format!("no {PROG_SECTION:?} section"))?;
        let code = elf.data(&prog)?;
        if code.is_empty() || code.len() % 8 != 0 {
            return Err(format!("{PROG_SECTION} section of {} bytes", code.len()));
        }
        let insns: Vec<u64> = code
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let mut license = match elf.section_named("license")? {
            Some((_, s)) => elf.data(&s)?.to_vec(),
            None => return Err("no license section".into()),
        };
        if license.last() != Some(&0) {
            license.push(0);
        }
        let mut map_refs = Vec::new();
        for i in 0..elf.shnum {
            let rel = elf.section(i)?;
            if rel.kind != SHT_REL || rel.info as usize != prog_idx {
                continue;
            }
            let symtab = elf.section(rel.link as usize)?;
            let strtab = elf.section(symtab.link as usize)?;
            let syms = elf.data(&symtab)?;
            let strs = elf.data(&strtab)?;
            for r in elf.data(&rel)?.chunks_exact(16) {
                let offset = le_u64(r, 0)? as usize;
                let sym = (le_u64(r, 8)? >> 32) as usize;
                let name_off = le_u32(syms, sym * 24)? as usize;
                let name = cstr(strs, name_off)?;
                if name != MAP_SYMBOL {
                    return Err(format!("relocation against {name:?}, not {MAP_SYMBOL}"));
                }
                let at = offset / 8;
                let opcode = insns.get(at).map(|i| *i as u8);
                if !offset.is_multiple_of(8) || opcode != Some(LD_IMM64) || at + 1 >= insns.len() {
                    return Err(format!("relocation at {offset} is not on an ld_imm64"));
                }
                map_refs.push(at);
            }
        }
        if map_refs.is_empty() {
            return Err(format!("no reference to {MAP_SYMBOL}"));
        }
        Ok(ProgramImage {
            insns,
            map_refs,
            license,
        })
    }

    /// The instructions with every map reference turned into "the map with fd `map_fd`".
    fn patched(&self, map_fd: RawFd) -> Vec<u64> {
        let mut insns = self.insns.clone();
        for &at in &self.map_refs {
            let mut b = insns[at].to_le_bytes();
            // regs byte: dst in the low nibble, src (here: the pseudo-source "map fd") high.
            b[1] = (b[1] & 0x0f) | (BPF_PSEUDO_MAP_FD << 4);
            b[4..8].copy_from_slice(&map_fd.to_le_bytes());
            insns[at] = u64::from_le_bytes(b);
        }
        insns
    }
}

const SHT_REL: u32 = 9;

struct Section {
    name: u32,
    kind: u32,
    offset: usize,
    size: usize,
    link: u32,
    info: u32,
}

/// Just enough of an ELF64 little-endian reader for the section table.
struct Elf<'a> {
    obj: &'a [u8],
    shoff: usize,
    shentsize: usize,
    shnum: usize,
    shstrndx: usize,
}

fn le_u64(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| format!("truncated at {at}"))
}

fn le_u32(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| format!("truncated at {at}"))
}

fn le_u16(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or_else(|| format!("truncated at {at}"))
}

fn cstr(b: &[u8], at: usize) -> Result<&str, String> {
    let s = b
        .get(at..)
        .ok_or_else(|| format!("string at {at} out of range"))?;
    let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
    std::str::from_utf8(&s[..end]).map_err(|_| format!("string at {at} is not UTF-8"))
}

impl<'a> Elf<'a> {
    fn new(obj: &'a [u8]) -> Result<Elf<'a>, String> {
        // Magic, 64-bit, little-endian, machine EM_BPF (247).
        if obj.get(..6) != Some(b"\x7fELF\x02\x01") || le_u16(obj, 0x12)? != 247 {
            return Err("not an ELF64 little-endian BPF object".into());
        }
        Ok(Elf {
            obj,
            shoff: le_u64(obj, 0x28)? as usize,
            shentsize: usize::from(le_u16(obj, 0x3a)?),
            shnum: usize::from(le_u16(obj, 0x3c)?),
            shstrndx: usize::from(le_u16(obj, 0x3e)?),
        })
    }

    fn section(&self, i: usize) -> Result<Section, String> {
        if i >= self.shnum || self.shentsize < 64 {
            return Err(format!("section {i} out of range"));
        }
        let h = self.shoff + i * self.shentsize;
        Ok(Section {
            name: le_u32(self.obj, h)?,
            kind: le_u32(self.obj, h + 4)?,
            offset: le_u64(self.obj, h + 24)? as usize,
            size: le_u64(self.obj, h + 32)? as usize,
            link: le_u32(self.obj, h + 40)?,
            info: le_u32(self.obj, h + 44)?,
        })
    }

    fn data(&self, s: &Section) -> Result<&'a [u8], String> {
        s.offset
            .checked_add(s.size)
            .and_then(|end| self.obj.get(s.offset..end))
            .ok_or_else(|| "section data out of range".to_string())
    }

    fn section_named(&self, name: &str) -> Result<Option<(usize, Section)>, String> {
        let names = self.data(&self.section(self.shstrndx)?)?;
        for i in 0..self.shnum {
            let s = self.section(i)?;
            if cstr(names, s.name as usize)? == name {
                return Ok(Some((i, s)));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_an_object() {
        assert!(ProgramImage::parse(b"").is_err());
        assert!(ProgramImage::parse(&[0x7f; 200]).is_err());
        let mut elf = b"\x7fELF\x02\x01".to_vec();
        elf.resize(64, 0);
        elf[0x12] = 247;
        elf[0x3a] = 64;
        elf[0x3c] = 200; // sections that are not there
        assert!(ProgramImage::parse(&elf).is_err());
    }

    #[cfg(dva_xdp_built)]
    #[test]
    fn built_object_has_one_map_reference_to_patch() {
        let image = ProgramImage::parse(XDP_OBJECT.unwrap()).unwrap();
        assert_eq!(image.map_refs.len(), 1);
        assert_eq!(image.license.last(), Some(&0));
        let patched = image.patched(42);
        let b = patched[image.map_refs[0]].to_le_bytes();
        assert_eq!(b[0], LD_IMM64);
        assert_eq!(b[1] >> 4, BPF_PSEUDO_MAP_FD);
        assert_eq!(i32::from_le_bytes(b[4..8].try_into().unwrap()), 42);
        // Every truncation of the object fails cleanly.
        let obj = XDP_OBJECT.unwrap();
        for len in (0..obj.len()).step_by(97) {
            let _ = ProgramImage::parse(&obj[..len]);
        }
    }
}
