//! C layout of a described struct under an ABI: each field at the next multiple of its
//! alignment, the struct aligned to its most-aligned member and padded to a multiple of that.

use super::{Abi, Elem, Schema};

/// Where one field sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldLayout {
    /// Field name.
    pub name: String,
    /// Offset from the start of the struct.
    pub offset: u32,
    /// Size of the whole field (all elements of an array).
    pub size: u32,
    /// Alignment.
    pub align: u32,
    /// Element type.
    pub elem: Elem,
    /// Array length, if an array.
    pub count: Option<u32>,
}

/// A struct's layout under one ABI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StructLayout {
    /// Struct name.
    pub name: String,
    /// `sizeof`.
    pub size: u32,
    /// In-struct alignment (`_Alignof`).
    pub align: u32,
    /// Fields in declaration order.
    pub fields: Vec<FieldLayout>,
}

pub(super) fn align_up(n: u32, align: u32) -> u32 {
    n.div_ceil(align.max(1)) * align.max(1)
}

impl Schema {
    /// Size and alignment of one element.
    pub fn elem_size_align(&self, elem: Elem, abi: &Abi) -> (u32, u32) {
        match elem {
            Elem::Scalar(s) => (s.size(abi), s.align(abi)),
            Elem::Char => (1, 1),
            Elem::Struct(i) => match self.sizes.get(i).and_then(|s| s.get(abi.id as usize)) {
                // Computed once, when the struct was added; an ABI outside the list (a test's
                // own) is laid out afresh.
                Some(known) if super::ABIS.get(abi.id as usize) == Some(abi) => *known,
                _ => {
                    let l = self.layout(i, abi);
                    (l.size, l.align)
                }
            },
        }
    }

    /// The layout of the struct at `index` under `abi`. An index not from this schema gives an
    /// empty layout.
    pub fn layout(&self, index: usize, abi: &Abi) -> StructLayout {
        let Some(desc) = self.get(index) else {
            return StructLayout {
                name: String::new(),
                size: 0,
                align: 1,
                fields: Vec::new(),
            };
        };
        let mut offset = 0u32;
        let mut align = 1u32;
        let mut fields = Vec::with_capacity(desc.fields.len());
        for f in &desc.fields {
            let (elem_size, elem_align) = self.elem_size_align(f.elem, abi);
            let size = elem_size.saturating_mul(f.count.unwrap_or(1));
            offset = align_up(offset, elem_align);
            fields.push(FieldLayout {
                name: f.name.clone(),
                offset,
                size,
                align: elem_align,
                elem: f.elem,
                count: f.count,
            });
            offset = offset.saturating_add(size);
            align = align.max(elem_align);
        }
        StructLayout {
            name: desc.name.clone(),
            size: align_up(offset, align),
            align,
            fields,
        }
    }
}
