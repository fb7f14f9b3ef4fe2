//! Method tables: one row per selector, with exact scalar counts and bounded struct sizes.
//! A table is validated when it is built, so a loaded driver's table cannot hold an unbounded
//! size, a duplicate selector or a duplicate name.

use portcullis_proto::{
    Status, limits,
    pb::{self, MethodInfo},
};

use super::{CallArgs, CallOutput, DriverError};

/// Inclusive struct size bounds, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeRange {
    /// Smallest accepted size.
    pub min: u32,
    /// Largest accepted size (at most [`limits::MAX_STRUCT`]).
    pub max: u32,
}

impl SizeRange {
    /// No struct.
    pub const NONE: SizeRange = SizeRange { min: 0, max: 0 };

    /// Exactly `n` bytes.
    pub const fn exactly(n: u32) -> SizeRange {
        SizeRange { min: n, max: n }
    }

    /// `min..=max` bytes.
    pub const fn between(min: u32, max: u32) -> SizeRange {
        SizeRange { min, max }
    }

    fn contains(self, len: usize) -> bool {
        (self.min as usize..=self.max as usize).contains(&len)
    }
}

/// One row of a method table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodSpec {
    /// The selector clients call.
    pub selector: u32,
    /// The name policy and tools use.
    pub name: &'static str,
    /// Exact number of scalar inputs.
    pub scalar_in: u8,
    /// Exact number of scalar outputs.
    pub scalar_out: u8,
    /// Struct input bounds.
    pub struct_in: SizeRange,
    /// Struct output bounds.
    pub struct_out: SizeRange,
    /// Completes later, through a pending completion.
    pub is_async: bool,
    /// Privilege the grant must hold (clientHasPrivilege).
    pub privilege: Option<&'static str>,
}

/// A table row that breaks the rules.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// Selectors are dense: row `i` has selector `i`.
    #[error("method {name:?} has selector {selector}, expected {expected}")]
    SelectorOrder {
        /// The row's name.
        name: &'static str,
        /// Its selector.
        selector: u32,
        /// The row index.
        expected: u32,
    },
    /// Names are unique.
    #[error("method name {0:?} appears twice")]
    DuplicateName(&'static str),
    /// Bounds are `min <= max <= MAX_STRUCT`.
    #[error("method {0:?} has struct bounds outside 0..={max}", max = limits::MAX_STRUCT)]
    BadBounds(&'static str),
    /// At most [`limits::MAX_SCALARS`] scalars each way.
    #[error("method {0:?} has more than {max} scalars", max = limits::MAX_SCALARS)]
    TooManyScalars(&'static str),
}

/// A validated method table.
#[derive(Clone, Debug)]
pub struct MethodTable {
    rows: Vec<MethodSpec>,
}

impl MethodTable {
    /// Validates the rows.
    pub fn new(rows: &[MethodSpec]) -> Result<MethodTable, TableError> {
        for (i, row) in rows.iter().enumerate() {
            let expected = u32::try_from(i).unwrap_or(u32::MAX);
            if row.selector != expected {
                return Err(TableError::SelectorOrder {
                    name: row.name,
                    selector: row.selector,
                    expected,
                });
            }
            if rows.iter().take(i).any(|r| r.name == row.name) {
                return Err(TableError::DuplicateName(row.name));
            }
            let bounded = |r: SizeRange| r.min <= r.max && r.max <= limits::MAX_STRUCT;
            if !bounded(row.struct_in) || !bounded(row.struct_out) {
                return Err(TableError::BadBounds(row.name));
            }
            if usize::from(row.scalar_in.max(row.scalar_out)) > limits::MAX_SCALARS {
                return Err(TableError::TooManyScalars(row.name));
            }
        }
        Ok(MethodTable { rows: rows.to_vec() })
    }

    /// All rows, in selector order.
    pub fn rows(&self) -> &[MethodSpec] {
        &self.rows
    }

    /// The row for a selector.
    pub fn get(&self, selector: u32) -> Option<&MethodSpec> {
        self.rows.get(usize::try_from(selector).ok()?)
    }

    /// The row for a name.
    pub fn by_name(&self, name: &str) -> Option<&MethodSpec> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// The table as wire descriptions.
    pub fn infos(&self) -> Vec<MethodInfo> {
        self.rows
            .iter()
            .map(|r| MethodInfo {
                selector: r.selector,
                name: r.name.to_string(),
                scalar_in: u32::from(r.scalar_in),
                scalar_out: u32::from(r.scalar_out),
                struct_in: Some(pb::SizeRange {
                    min: r.struct_in.min,
                    max: r.struct_in.max,
                }),
                struct_out: Some(pb::SizeRange {
                    min: r.struct_out.min,
                    max: r.struct_out.max,
                }),
                is_async: r.is_async,
                privilege: r.privilege.unwrap_or_default().to_string(),
            })
            .collect()
    }
}

impl MethodSpec {
    /// Checks a call's arguments against this row: exact scalar count, struct size within
    /// bounds. The output capacity is clamped to the row's bound (asking for more is harmless).
    pub fn check_args(
        &self,
        scalars: Vec<u64>,
        struct_in: Vec<u8>,
        struct_out_cap: u32,
    ) -> Result<CallArgs, DriverError> {
        if scalars.len() != usize::from(self.scalar_in) {
            return Err(DriverError::new(
                Status::BadArgument,
                format!(
                    "{} takes {} scalar(s), got {}",
                    self.name,
                    self.scalar_in,
                    scalars.len()
                ),
            ));
        }
        if !self.struct_in.contains(struct_in.len()) {
            return Err(DriverError::new(
                Status::BadArgument,
                format!(
                    "{} takes a struct of {}..={} bytes, got {}",
                    self.name,
                    self.struct_in.min,
                    self.struct_in.max,
                    struct_in.len()
                ),
            ));
        }
        let struct_out_cap = struct_out_cap.min(self.struct_out.max) as usize;
        Ok(CallArgs {
            scalars,
            struct_in,
            struct_out_cap,
        })
    }

    /// Checks a driver's output against this row and the caller's capacity: a driver bug or a
    /// too-small client buffer becomes a status, never a short or oversized reply.
    pub fn check_output(&self, out: &CallOutput, cap: usize) -> Result<(), DriverError> {
        if out.scalars.len() != usize::from(self.scalar_out) {
            return Err(DriverError::new(
                Status::Internal,
                format!(
                    "{} returned {} scalar(s), table says {}",
                    self.name,
                    out.scalars.len(),
                    self.scalar_out
                ),
            ));
        }
        if !self.struct_out.contains(out.struct_out.len()) {
            return Err(DriverError::new(
                Status::Internal,
                format!(
                    "{} returned a struct of {} bytes outside its table bounds",
                    self.name,
                    out.struct_out.len()
                ),
            ));
        }
        if out.struct_out.len() > cap {
            return Err(DriverError::new(
                Status::BadArgument,
                format!(
                    "{} needs {} output bytes, the caller accepts {cap}",
                    self.name,
                    out.struct_out.len()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD: MethodSpec = MethodSpec {
        selector: 0,
        name: "add",
        scalar_in: 2,
        scalar_out: 1,
        struct_in: SizeRange::NONE,
        struct_out: SizeRange::NONE,
        is_async: false,
        privilege: None,
    };

    #[test]
    fn table_selectors_must_be_dense() {
        let bad = MethodSpec { selector: 1, ..ADD };
        assert!(matches!(
            MethodTable::new(&[bad]),
            Err(TableError::SelectorOrder { .. })
        ));
    }

    #[test]
    fn table_unbounded_struct_is_refused() {
        let bad = MethodSpec {
            struct_in: SizeRange::between(0, limits::MAX_STRUCT + 1),
            ..ADD
        };
        assert_eq!(MethodTable::new(&[bad]).unwrap_err(), TableError::BadBounds("add"));
        let inverted = MethodSpec {
            struct_out: SizeRange::between(5, 4),
            ..ADD
        };
        assert_eq!(MethodTable::new(&[inverted]).unwrap_err(), TableError::BadBounds("add"));
    }

    #[test]
    fn table_duplicate_name_is_refused() {
        let second = MethodSpec { selector: 1, ..ADD };
        assert_eq!(
            MethodTable::new(&[ADD, second]).unwrap_err(),
            TableError::DuplicateName("add")
        );
    }

    #[test]
    fn check_args_wrong_scalar_count_is_bad_argument() {
        assert_eq!(
            ADD.check_args(vec![1], vec![], 0).unwrap_err().status,
            Status::BadArgument
        );
        assert_eq!(
            ADD.check_args(vec![1, 2, 3], vec![], 0).unwrap_err().status,
            Status::BadArgument
        );
        assert!(ADD.check_args(vec![1, 2], vec![], 0).is_ok());
    }

    #[test]
    fn check_args_struct_out_of_bounds_is_bad_argument() {
        let echo = MethodSpec {
            struct_in: SizeRange::between(1, 4),
            struct_out: SizeRange::between(0, 4),
            scalar_in: 0,
            ..ADD
        };
        assert!(echo.check_args(vec![], vec![], 4).is_err());
        assert!(echo.check_args(vec![], vec![0; 5], 4).is_err());
        let args = echo.check_args(vec![], vec![0; 4], 1 << 20).unwrap();
        assert_eq!(args.struct_out_cap, 4);
    }

    #[test]
    fn check_output_too_small_capacity_is_bad_argument() {
        let echo = MethodSpec {
            struct_out: SizeRange::between(0, 4),
            scalar_out: 0,
            ..ADD
        };
        let out = CallOutput {
            scalars: vec![],
            struct_out: vec![1, 2, 3],
        };
        assert_eq!(echo.check_output(&out, 2).unwrap_err().status, Status::BadArgument);
        assert!(echo.check_output(&out, 3).is_ok());
        let wrong = CallOutput {
            scalars: vec![1],
            struct_out: vec![],
        };
        assert_eq!(echo.check_output(&wrong, 4).unwrap_err().status, Status::Internal);
    }
}
