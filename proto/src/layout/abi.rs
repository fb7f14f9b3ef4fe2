//! The closed list of client ABIs: byte order, pointer and `long` width, and the in-struct
//! alignment of every kind. Numbers are part of the wire contract (`Hello`) and never change.

use std::fmt;

/// A client ABI. The discriminant is its wire number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum AbiId {
    /// x86-64 System V (LP64, little-endian).
    X86_64 = 0,
    /// i386 System V (ILP32, little-endian; 64-bit integers and `double` 4-aligned in structs).
    I386 = 1,
    /// x32 (ILP32 on x86-64, little-endian; 64-bit types 8-aligned).
    X32 = 2,
    /// ARM EABI hard-float (ILP32, little-endian).
    Armhf = 3,
    /// AArch64 (LP64, little-endian).
    Aarch64 = 4,
    /// 32-bit PowerPC (ILP32, big-endian).
    Powerpc = 5,
    /// 64-bit PowerPC, big-endian (LP64).
    Ppc64 = 6,
    /// 64-bit PowerPC, little-endian (LP64).
    Ppc64le = 7,
    /// IBM Z (LP64, big-endian).
    S390x = 8,
    /// RISC-V 64 (LP64, little-endian).
    Riscv64 = 9,
    /// MIPS o32, big-endian (ILP32).
    Mips = 10,
    /// MIPS o32, little-endian (ILP32).
    Mipsel = 11,
    /// m68k (ILP32, big-endian; every type of 2 bytes or more 2-aligned).
    M68k = 12,
    /// SuperH SH-4 (ILP32, little-endian).
    Sh4 = 13,
    /// PA-RISC 32 (ILP32, big-endian).
    Hppa = 14,
    /// SPARC64 (LP64, big-endian).
    Sparc64 = 15,
}

/// What a layout needs to know of an ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abi {
    /// Which one.
    pub id: AbiId,
    /// Short name (`i386`), as policy and tools spell it.
    pub name: &'static str,
    /// Big-endian.
    pub big_endian: bool,
    /// `sizeof(void *)` and of a handle.
    pub pointer: u8,
    /// `sizeof(long)`.
    pub long: u8,
    /// In-struct alignment of 8-byte integers.
    pub align_i64: u8,
    /// In-struct alignment of `double`.
    pub align_f64: u8,
    /// No type is aligned more than this (m68k: 2).
    pub align_cap: u8,
    /// A GNU target triple whose compiler lays structs out this way.
    pub triple: &'static str,
}

const fn abi(id: AbiId, name: &'static str, big_endian: bool, lp64: bool, align64: u8, triple: &'static str) -> Abi {
    let word = if lp64 { 8 } else { 4 };
    Abi {
        id,
        name,
        big_endian,
        pointer: word,
        long: word,
        align_i64: align64,
        align_f64: align64,
        align_cap: 8,
        triple,
    }
}

/// Every supported ABI, in wire-number order.
pub const ABIS: [Abi; 16] = [
    abi(AbiId::X86_64, "x86_64", false, true, 8, "x86_64-linux-gnu"),
    abi(AbiId::I386, "i386", false, false, 4, "i686-linux-gnu"),
    abi(AbiId::X32, "x32", false, false, 8, "x86_64-linux-gnux32"),
    abi(AbiId::Armhf, "armhf", false, false, 8, "arm-linux-gnueabihf"),
    abi(AbiId::Aarch64, "aarch64", false, true, 8, "aarch64-linux-gnu"),
    abi(AbiId::Powerpc, "powerpc", true, false, 8, "powerpc-linux-gnu"),
    abi(AbiId::Ppc64, "ppc64", true, true, 8, "powerpc64-linux-gnu"),
    abi(AbiId::Ppc64le, "ppc64le", false, true, 8, "powerpc64le-linux-gnu"),
    abi(AbiId::S390x, "s390x", true, true, 8, "s390x-linux-gnu"),
    abi(AbiId::Riscv64, "riscv64", false, true, 8, "riscv64-linux-gnu"),
    abi(AbiId::Mips, "mips", true, false, 8, "mips-linux-gnu"),
    abi(AbiId::Mipsel, "mipsel", false, false, 8, "mipsel-linux-gnu"),
    Abi {
        align_cap: 2,
        ..abi(AbiId::M68k, "m68k", true, false, 2, "m68k-linux-gnu")
    },
    abi(AbiId::Sh4, "sh4", false, false, 4, "sh4-linux-gnu"),
    abi(AbiId::Hppa, "hppa", true, false, 8, "hppa-linux-gnu"),
    abi(AbiId::Sparc64, "sparc64", true, true, 8, "sparc64-linux-gnu"),
];

impl AbiId {
    /// The ABI with this wire number.
    pub fn from_wire(n: u8) -> Option<AbiId> {
        ABIS.iter().map(|a| a.id).find(|id| *id as u8 == n)
    }

    /// The ABI's description.
    #[allow(clippy::indexing_slicing)] // every discriminant is an index of ABIS (tested)
    pub fn abi(self) -> &'static Abi {
        &ABIS[self as usize]
    }

    /// The ABI this program was compiled for, if it is in the list.
    pub fn native() -> AbiId {
        #[cfg(all(target_arch = "x86_64", target_pointer_width = "64"))]
        return AbiId::X86_64;
        #[cfg(all(target_arch = "x86_64", target_pointer_width = "32"))]
        return AbiId::X32;
        #[cfg(target_arch = "x86")]
        return AbiId::I386;
        #[cfg(target_arch = "aarch64")]
        return AbiId::Aarch64;
        #[cfg(target_arch = "arm")]
        return AbiId::Armhf;
        #[cfg(all(target_arch = "powerpc64", target_endian = "big"))]
        return AbiId::Ppc64;
        #[cfg(all(target_arch = "powerpc64", target_endian = "little"))]
        return AbiId::Ppc64le;
        #[cfg(target_arch = "powerpc")]
        return AbiId::Powerpc;
        #[cfg(target_arch = "s390x")]
        return AbiId::S390x;
        #[cfg(target_arch = "riscv64")]
        return AbiId::Riscv64;
        #[cfg(all(target_arch = "mips", target_endian = "big"))]
        return AbiId::Mips;
        #[cfg(all(target_arch = "mips", target_endian = "little"))]
        return AbiId::Mipsel;
        #[cfg(target_arch = "m68k")]
        return AbiId::M68k;
        #[cfg(target_arch = "sparc64")]
        return AbiId::Sparc64;
    }

    /// The ABI named `name` (`i386`, `ppc64le`, …).
    pub fn by_name(name: &str) -> Option<AbiId> {
        ABIS.iter().find(|a| a.name == name).map(|a| a.id)
    }
}

impl fmt::Display for AbiId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.abi().name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_table_is_indexed_by_wire_number() {
        for (i, abi) in ABIS.iter().enumerate() {
            assert_eq!(abi.id as usize, i);
            assert_eq!(AbiId::from_wire(i as u8), Some(abi.id));
            assert_eq!(AbiId::by_name(abi.name), Some(abi.id));
        }
        assert_eq!(AbiId::from_wire(16), None);
    }

    #[test]
    fn abi_native_matches_this_build() {
        let native = AbiId::native().abi();
        assert_eq!(usize::from(native.pointer), size_of::<usize>());
        assert_eq!(native.big_endian, cfg!(target_endian = "big"));
    }
}
