//! Just enough of ELF64 (little-endian, as on x86_64) to read a kernel module's `.modinfo` and a
//! binary's interpreter and needed libraries.
//!
//! The bytes come from files we did not write (a distribution's packages, the host's libraries),
//! so every offset and size is checked: a malformed file gives an error, never a panic.

pub(super) const MAGIC: &[u8; 4] = b"\x7fELF";
const CLASS_64: u8 = 2;
const DATA_LITTLE_ENDIAN: u8 = 1;

const EHDR_BYTES: usize = 64;
const SHDR_BYTES: usize = 64;
const PHDR_BYTES: usize = 56;
const DYN_BYTES: usize = 16;

const SHT_NOBITS: u32 = 8;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    Unsupported,
    #[error("the ELF {0} lies outside the file")]
    OutOfBounds(&'static str),
    #[error("the ELF {0} is not a terminated UTF-8 string")]
    BadString(&'static str),
    #[error("the ELF dynamic section names strings but has no string table")]
    NoStringTable,
}

/// An ELF64 little-endian file held in memory.
pub struct Elf<'a> {
    data: &'a [u8],
}

/// What the dynamic loader reads from a binary's `PT_DYNAMIC` segment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    pub needed: Vec<String>,
    /// `DT_RUNPATH`, or `DT_RPATH` when there is no `DT_RUNPATH` (the loader ignores RPATH then).
    pub search_path: Option<String>,
}

struct Segment {
    kind: u32,
    offset: u64,
    vaddr: u64,
    file_size: u64,
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.get(..4) != Some(MAGIC.as_slice()) {
            return Err(ElfError::NotElf);
        }
        if data.len() < EHDR_BYTES || data[4] != CLASS_64 || data[5] != DATA_LITTLE_ENDIAN {
            return Err(ElfError::Unsupported);
        }
        Ok(Self { data })
    }

    /// `e_machine`: which processor the code is for.
    pub fn machine(&self) -> Option<u16> {
        read_u16(self.data, 0x12)
    }

    /// The contents of the first section called `name`, if the file has one.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        let table = self.table(0x28, 0x3a, 0x3c, SHDR_BYTES, "section header table")?;
        let Some(strndx) = read_u16(self.data, 0x3e) else {
            return Err(ElfError::OutOfBounds("header"));
        };
        let Some(names_header) = table.get(usize::from(strndx)) else {
            return Err(ElfError::OutOfBounds("section name table index"));
        };
        let names = self.section_bytes(names_header)?;
        for header in &table {
            let name_offset = read_u32(header, 0).ok_or(ElfError::OutOfBounds("section header"))?;
            let section_name = c_string(names, u64::from(name_offset), "section name")?;
            if section_name == name {
                return self.section_bytes(header).map(Some);
            }
        }
        Ok(None)
    }

    /// The program interpreter (`PT_INTERP`), absent for a static binary.
    pub fn interpreter(&self) -> Result<Option<String>, ElfError> {
        let Some(interp) = self.segments()?.into_iter().find(|s| s.kind == PT_INTERP) else {
            return Ok(None);
        };
        let bytes = slice(self.data, interp.offset, interp.file_size, "interpreter")?;
        c_string(bytes, 0, "interpreter").map(|s| Some(s.to_owned()))
    }

    /// Needed libraries and search path from `PT_DYNAMIC`; empty for a static binary.
    pub fn dynamic(&self) -> Result<Dynamic, ElfError> {
        let segments = self.segments()?;
        let Some(dynamic) = segments.iter().find(|s| s.kind == PT_DYNAMIC) else {
            return Ok(Dynamic::default());
        };
        let entries = slice(
            self.data,
            dynamic.offset,
            dynamic.file_size,
            "dynamic section",
        )?;
        let (mut strtab, mut strsz) = (None, None);
        let (mut needed, mut rpath, mut runpath) = (Vec::new(), None, None);
        for entry in entries.chunks_exact(DYN_BYTES) {
            let (Some(tag), Some(value)) = (read_u64(entry, 0), read_u64(entry, 8)) else {
                return Err(ElfError::OutOfBounds("dynamic entry"));
            };
            match tag {
                DT_NULL => break,
                DT_NEEDED => needed.push(value),
                DT_STRTAB => strtab = Some(value),
                DT_STRSZ => strsz = Some(value),
                DT_RPATH => rpath = Some(value),
                DT_RUNPATH => runpath = Some(value),
                _ => {}
            }
        }
        if needed.is_empty() && rpath.is_none() && runpath.is_none() {
            return Ok(Dynamic::default());
        }
        let (Some(strtab), Some(strsz)) = (strtab, strsz) else {
            return Err(ElfError::NoStringTable);
        };
        let strtab_offset = file_offset(&segments, strtab)?;
        let strings = slice(self.data, strtab_offset, strsz, "dynamic string table")?;
        let string = |offset| c_string(strings, offset, "dynamic string").map(str::to_owned);
        Ok(Dynamic {
            needed: needed.into_iter().map(string).collect::<Result<_, _>>()?,
            search_path: runpath.or(rpath).map(string).transpose()?,
        })
    }

    fn segments(&self) -> Result<Vec<Segment>, ElfError> {
        self.table(0x20, 0x36, 0x38, PHDR_BYTES, "program header table")?
            .into_iter()
            .map(|header| {
                let field =
                    |off| read_u64(header, off).ok_or(ElfError::OutOfBounds("program header"));
                Ok(Segment {
                    kind: read_u32(header, 0).ok_or(ElfError::OutOfBounds("program header"))?,
                    offset: field(8)?,
                    vaddr: field(16)?,
                    file_size: field(32)?,
                })
            })
            .collect()
    }

    /// The entries of a header table whose offset, entry size and count the ELF header holds at
    /// the given positions.
    fn table(
        &self,
        offset_at: usize,
        entry_size_at: usize,
        count_at: usize,
        min_entry: usize,
        what: &'static str,
    ) -> Result<Vec<&'a [u8]>, ElfError> {
        let (Some(offset), Some(entry_size), Some(count)) = (
            read_u64(self.data, offset_at),
            read_u16(self.data, entry_size_at),
            read_u16(self.data, count_at),
        ) else {
            return Err(ElfError::OutOfBounds("header"));
        };
        if count == 0 {
            return Ok(Vec::new());
        }
        let entry_size = usize::from(entry_size);
        if entry_size < min_entry {
            return Err(ElfError::OutOfBounds(what));
        }
        let len = entry_size as u64 * u64::from(count);
        let bytes = slice(self.data, offset, len, what)?;
        Ok(bytes.chunks_exact(entry_size).collect())
    }

    fn section_bytes(&self, header: &[u8]) -> Result<&'a [u8], ElfError> {
        let (Some(kind), Some(offset), Some(size)) = (
            read_u32(header, 4),
            read_u64(header, 24),
            read_u64(header, 32),
        ) else {
            return Err(ElfError::OutOfBounds("section header"));
        };
        if kind == SHT_NOBITS {
            return Ok(&[]);
        }
        slice(self.data, offset, size, "section")
    }
}

/// Maps a virtual address to its place in the file through the loadable segments, as the loader
/// would map them.
fn file_offset(segments: &[Segment], vaddr: u64) -> Result<u64, ElfError> {
    segments
        .iter()
        .filter(|s| s.kind == PT_LOAD)
        .find_map(|s| {
            let delta = vaddr.checked_sub(s.vaddr)?;
            (delta < s.file_size).then(|| s.offset.checked_add(delta))?
        })
        .ok_or(ElfError::OutOfBounds("dynamic string table"))
}

fn slice<'a>(
    data: &'a [u8],
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<&'a [u8], ElfError> {
    let start = usize::try_from(offset).map_err(|_| ElfError::OutOfBounds(what))?;
    let len = usize::try_from(len).map_err(|_| ElfError::OutOfBounds(what))?;
    let end = start.checked_add(len).ok_or(ElfError::OutOfBounds(what))?;
    data.get(start..end).ok_or(ElfError::OutOfBounds(what))
}

fn c_string<'a>(data: &'a [u8], offset: u64, what: &'static str) -> Result<&'a str, ElfError> {
    let start = usize::try_from(offset).map_err(|_| ElfError::OutOfBounds(what))?;
    let rest = data.get(start..).ok_or(ElfError::OutOfBounds(what))?;
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(ElfError::BadString(what))?;
    std::str::from_utf8(&rest[..end]).map_err(|_| ElfError::BadString(what))
}

pub(super) fn read_u16(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        data.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(super) fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(data: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Builds small ELF files for tests: a header, named sections, and optionally program headers.
#[cfg(test)]
pub mod testing {
    /// An ELF64 file with the given sections (and a section name table after them).
    pub fn elf_with_sections(sections: &[(&str, &[u8])]) -> Vec<u8> {
        let mut names = vec![0u8];
        let mut name_offsets = Vec::new();
        for (name, _) in sections {
            name_offsets.push(names.len() as u32);
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        let shstrtab_name = names.len() as u32;
        names.extend_from_slice(b".shstrtab\0");

        let mut file = header();
        let mut placed = Vec::new();
        for (_, body) in sections {
            placed.push((file.len() as u64, body.len() as u64));
            file.extend_from_slice(body);
        }
        let names_at = file.len() as u64;
        file.extend_from_slice(&names);
        while !file.len().is_multiple_of(8) {
            file.push(0);
        }
        let shoff = file.len() as u64;
        file.extend_from_slice(&[0u8; 64]);
        for (name, (offset, size)) in name_offsets.iter().zip(&placed) {
            file.extend_from_slice(&section_header(*name, 1, *offset, *size));
        }
        file.extend_from_slice(&section_header(
            shstrtab_name,
            3,
            names_at,
            names.len() as u64,
        ));
        let count = sections.len() as u16 + 2;
        file[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        file[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        file[0x3c..0x3e].copy_from_slice(&count.to_le_bytes());
        file[0x3e..0x40].copy_from_slice(&(count - 1).to_le_bytes());
        file
    }

    /// A dynamic executable whose loadable segment maps the whole file at address 0.
    pub fn elf_dynamic(interpreter: &str, needed: &[&str], runpath: Option<&str>) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut add = |s: &str| {
            let at = strings.len() as u64;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            at
        };
        let needed_at: Vec<u64> = needed.iter().map(|n| add(n)).collect();
        let runpath_at = runpath.map(&mut add);
        let interp_at = add(interpreter);

        let phdrs = 3u64;
        let strtab_offset = 64 + phdrs * 56;
        let mut dynamic = Vec::new();
        for at in needed_at {
            dynamic.extend_from_slice(&[1u64.to_le_bytes(), at.to_le_bytes()].concat());
        }
        if let Some(at) = runpath_at {
            dynamic.extend_from_slice(&[29u64.to_le_bytes(), at.to_le_bytes()].concat());
        }
        dynamic.extend_from_slice(&[5u64.to_le_bytes(), strtab_offset.to_le_bytes()].concat());
        dynamic.extend_from_slice(
            &[10u64.to_le_bytes(), (strings.len() as u64).to_le_bytes()].concat(),
        );
        dynamic.extend_from_slice(&[0u8; 16]);
        let dynamic_offset = strtab_offset + strings.len() as u64;
        let total = dynamic_offset + dynamic.len() as u64;

        let mut file = header();
        file[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        file[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        file[0x38..0x3a].copy_from_slice(&(phdrs as u16).to_le_bytes());
        file.extend_from_slice(&program_header(
            3,
            strtab_offset + interp_at,
            interpreter.len() as u64 + 1,
        ));
        file.extend_from_slice(&program_header(1, 0, total));
        file.extend_from_slice(&program_header(2, dynamic_offset, dynamic.len() as u64));
        file.extend_from_slice(&strings);
        file.extend_from_slice(&dynamic);
        file
    }

    fn header() -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[6] = 1;
        h[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        h[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        h
    }

    fn section_header(name: u32, kind: u32, offset: u64, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[0..4].copy_from_slice(&name.to_le_bytes());
        h[4..8].copy_from_slice(&kind.to_le_bytes());
        h[24..32].copy_from_slice(&offset.to_le_bytes());
        h[32..40].copy_from_slice(&size.to_le_bytes());
        h
    }

    fn program_header(kind: u32, offset: u64, size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 56];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&offset.to_le_bytes());
        h[16..24].copy_from_slice(&offset.to_le_bytes());
        h[32..40].copy_from_slice(&size.to_le_bytes());
        h[40..48].copy_from_slice(&size.to_le_bytes());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn finds_a_named_section() {
        let file = elf_with_sections(&[(".text", b"code"), (".modinfo", b"depends=a,b\0")]);
        let elf = Elf::parse(&file).unwrap();
        assert_eq!(
            elf.section(".modinfo").unwrap(),
            Some(&b"depends=a,b\0"[..])
        );
        assert_eq!(elf.section(".missing").unwrap(), None);
    }

    #[test]
    fn reads_interpreter_needed_and_runpath() {
        let file = elf_dynamic(
            "/lib64/ld.so",
            &["liba.so.1", "libb.so.2"],
            Some("$ORIGIN/lib"),
        );
        let elf = Elf::parse(&file).unwrap();
        assert_eq!(elf.interpreter().unwrap().as_deref(), Some("/lib64/ld.so"));
        let dynamic = elf.dynamic().unwrap();
        assert_eq!(dynamic.needed, ["liba.so.1", "libb.so.2"]);
        assert_eq!(dynamic.search_path.as_deref(), Some("$ORIGIN/lib"));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let files = [
            elf_with_sections(&[(".modinfo", b"depends=a\0")]),
            elf_dynamic("/lib64/ld.so", &["liba.so.1"], None),
        ];
        for file in files {
            for len in 0..file.len() {
                exercise(&file[..len]);
            }
            for at in 0..file.len() {
                for byte in [0x00, 0x7f, 0xff] {
                    let mut bad = file.clone();
                    bad[at] = byte;
                    exercise(&bad);
                }
            }
        }
    }

    fn exercise(data: &[u8]) {
        if let Ok(elf) = Elf::parse(data) {
            let _ = elf.section(".modinfo");
            let _ = elf.interpreter();
            let _ = elf.dynamic();
        }
    }
}
