//! Method tables: one row per selector, with exact scalar counts and bounded struct sizes.
//! A table is validated when it is built, so a loaded driver's table cannot hold an unbounded
//! size, a duplicate selector or a duplicate name.
//!
//! A row may name a struct layout from the driver's schema for its input or output. Its sizes
//! then come from the layout, and the table holds one translation plan per ABI for it, compiled
//! once: a call is checked against the exact size in the caller's ABI and translated.

use portcullis_proto::{
    Status,
    layout::{ABIS, AbiId, Elem, Plan, Scalar, Schema, TranslateError},
    limits,
    pb::{self, MethodInfo},
};

use portcullis_policy::ParamAt;

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
    /// Struct layout of the input, from the driver's schema (sizes then come from it).
    pub in_layout: Option<&'static str>,
    /// Struct layout of the output.
    pub out_layout: Option<&'static str>,
    /// Names of the scalar inputs, in order (policy constrains arguments by name).
    pub scalar_names: &'static [&'static str],
    /// The largest value each limited scalar input may take, by name: the session core refuses
    /// a larger one (`BAD_ARGUMENT`) before the driver runs, and the generated headers say so.
    pub scalar_max: &'static [(&'static str, u64)],
    /// The statuses the driver itself ends this method's calls with, each with what it means
    /// here (`UNSUPPORTED`: "the device has no modem lines (a pty)"). With the statuses every
    /// call can end with ([`MethodSpec::EVERY_CALL`]) they are the method's contract: the
    /// generated headers list them, and a driver that ends a call with any other status is
    /// reported as `INTERNAL` (a driver bug), never passed on.
    pub statuses: &'static [(Status, &'static str)],
}

/// A table row that breaks the rules.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// Selectors are strictly ascending (so each is unique).
    #[error("method {name:?} has selector {selector}, which does not follow the previous row's")]
    SelectorOrder {
        /// The row's name.
        name: &'static str,
        /// Its selector.
        selector: u32,
    },
    /// A row names a layout the schema does not describe.
    #[error("method {name:?} names unknown layout {layout:?}")]
    UnknownLayout {
        /// The row's name.
        name: &'static str,
        /// The layout it names.
        layout: &'static str,
    },
    /// Names are unique.
    #[error("method name {0:?} appears twice")]
    DuplicateName(&'static str),
    /// Bounds are `min <= max <= MAX_STRUCT`.
    #[error("method {0:?} has struct bounds outside 0..={max}", max = limits::MAX_STRUCT)]
    BadBounds(&'static str),
    /// Every scalar input has a name.
    #[error("method {0:?} must name each of its scalar inputs")]
    ScalarNames(&'static str),
    /// At most [`limits::MAX_SCALARS`] scalars each way.
    #[error("method {0:?} has more than {max} scalars", max = limits::MAX_SCALARS)]
    TooManyScalars(&'static str),
    /// A status listed twice, or one only the session ends calls with.
    #[error("method {name:?} lists {status:?} twice or as the driver's, which it cannot be")]
    BadStatus {
        /// The row's name.
        name: &'static str,
        /// The status.
        status: Status,
    },
    /// A scalar limit names a scalar input of the row.
    #[error("method {name:?} limits {scalar:?}, which is not one of its scalar inputs")]
    UnknownLimit {
        /// The row's name.
        name: &'static str,
        /// The name limited.
        scalar: &'static str,
    },
}

/// Translation plans of one row's layout, indexed by ABI wire number.
#[derive(Clone, Debug)]
struct Plans {
    name: &'static str,
    by_abi: Vec<Plan>,
}

/// One row with its compiled plans.
#[derive(Clone, Debug)]
struct Row {
    spec: MethodSpec,
    /// Parameters policy may constrain: scalars by name, `len` (struct input length), and the
    /// top-level integer and `char[N]` fields of the input layout, at native offsets.
    params: Vec<(String, ParamAt)>,
    /// Client layout → native, for the input.
    inbound: Option<Plans>,
    /// Native → client layout, for the output.
    outbound: Option<Plans>,
}

/// A validated method table.
#[derive(Clone, Debug)]
pub struct MethodTable {
    rows: Vec<Row>,
    specs: Vec<MethodSpec>,
}

/// A row's parameters: its scalars by name, `len` when it takes a struct (unless a scalar has
/// that name), and the top-level integer and `char[N]` fields of its input layout.
fn params(schema: &Schema, spec: &MethodSpec) -> Vec<(String, ParamAt)> {
    let mut params: Vec<(String, ParamAt)> = spec
        .scalar_names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), ParamAt::Scalar(i)))
        .collect();
    if spec.struct_in.max > 0 && !spec.scalar_names.contains(&"len") {
        params.push(("len".into(), ParamAt::StructLen));
    }
    let layout = spec
        .in_layout
        .and_then(|l| schema.index(l))
        .map(|i| schema.layout(i, AbiId::native().abi()));
    for f in layout.iter().flat_map(|l| &l.fields) {
        let at = match (f.elem, f.count) {
            (Elem::Char, Some(len)) => ParamAt::Chars { offset: f.offset, len },
            (Elem::Scalar(s), None) if !matches!(s, Scalar::F32 | Scalar::F64) => ParamAt::Field {
                offset: f.offset,
                size: u8::try_from(f.size).unwrap_or(8),
                signed: s.is_signed(),
            },
            _ => continue,
        };
        params.push((f.name.clone(), at));
    }
    params
}

/// Plans for every ABI: `from_client` picks the direction.
fn plans(schema: &Schema, row: &MethodSpec, layout: &'static str, from_client: bool) -> Result<Plans, TableError> {
    let index = schema
        .index(layout)
        .ok_or(TableError::UnknownLayout { name: row.name, layout })?;
    let native = AbiId::native().abi();
    let by_abi = ABIS
        .iter()
        .map(|client| {
            if from_client {
                schema.plan(index, client, native)
            } else {
                schema.plan(index, native, client)
            }
        })
        .collect();
    Ok(Plans { name: layout, by_abi })
}

impl MethodTable {
    /// Validates rows that carry no struct layouts.
    pub fn new(rows: &[MethodSpec]) -> Result<MethodTable, TableError> {
        MethodTable::with_schema(rows, &Schema::default())
    }

    /// Validates the rows and compiles the plans of the layouts they name from `schema`. A row
    /// with a layout gets its struct bounds from the layout's native size.
    pub fn with_schema(rows: &[MethodSpec], schema: &Schema) -> Result<MethodTable, TableError> {
        let mut built: Vec<Row> = Vec::with_capacity(rows.len());
        for row in rows {
            if built.last().is_some_and(|prev| prev.spec.selector >= row.selector) {
                return Err(TableError::SelectorOrder {
                    name: row.name,
                    selector: row.selector,
                });
            }
            if built.iter().any(|r| r.spec.name == row.name) {
                return Err(TableError::DuplicateName(row.name));
            }
            let mut spec = *row;
            let inbound = row.in_layout.map(|l| plans(schema, row, l, true)).transpose()?;
            let outbound = row.out_layout.map(|l| plans(schema, row, l, false)).transpose()?;
            let native = AbiId::native() as usize;
            let native_size = |p: &Plans, from_client: bool| {
                p.by_abi
                    .get(native)
                    .map_or(0, |plan| if from_client { plan.dst_size() } else { plan.src_size() })
            };
            if let Some(p) = &inbound {
                spec.struct_in = SizeRange::exactly(u32::try_from(native_size(p, true)).unwrap_or(u32::MAX));
            }
            if let Some(p) = &outbound {
                spec.struct_out = SizeRange::exactly(u32::try_from(native_size(p, false)).unwrap_or(u32::MAX));
            }
            let bounded = |r: SizeRange| r.min <= r.max && r.max <= limits::MAX_STRUCT;
            if !bounded(spec.struct_in) || !bounded(spec.struct_out) {
                return Err(TableError::BadBounds(row.name));
            }
            if usize::from(row.scalar_in.max(row.scalar_out)) > limits::MAX_SCALARS {
                return Err(TableError::TooManyScalars(row.name));
            }
            if row.scalar_names.len() != usize::from(row.scalar_in) {
                return Err(TableError::ScalarNames(row.name));
            }
            if let Some((scalar, _)) = row.scalar_max.iter().find(|(n, _)| !row.scalar_names.contains(n)) {
                return Err(TableError::UnknownLimit { name: row.name, scalar });
            }
            for (i, (status, _)) in row.statuses.iter().enumerate() {
                let again = row.statuses.iter().skip(i + 1).any(|(s, _)| s == status);
                if again || MethodSpec::SESSION_ONLY.contains(status) {
                    return Err(TableError::BadStatus {
                        name: row.name,
                        status: *status,
                    });
                }
            }
            let params = params(schema, &spec);
            built.push(Row {
                spec,
                params,
                inbound,
                outbound,
            });
        }
        let specs = built.iter().map(|r| r.spec).collect();
        Ok(MethodTable { rows: built, specs })
    }

    /// The parameters of row `index`, for argument constraints.
    pub fn params(&self, index: usize) -> &[(String, ParamAt)] {
        self.rows.get(index).map_or(&[], |r| r.params.as_slice())
    }

    /// All rows, in selector order (sizes native).
    pub fn rows(&self) -> &[MethodSpec] {
        &self.specs
    }

    /// The row index and row for a selector.
    pub fn get(&self, selector: u32) -> Option<(usize, &MethodSpec)> {
        let index = self.rows.binary_search_by_key(&selector, |r| r.spec.selector).ok()?;
        self.specs.get(index).map(|spec| (index, spec))
    }

    /// The row for a name.
    pub fn by_name(&self, name: &str) -> Option<&MethodSpec> {
        self.specs.iter().find(|r| r.name == name)
    }

    /// Whether row `index`'s output can overflow on some ABI (its layout narrows there).
    pub fn narrows(&self, index: usize) -> bool {
        self.rows
            .get(index)
            .and_then(|r| r.outbound.as_ref())
            .is_some_and(|p| p.by_abi.iter().any(Plan::can_overflow))
    }

    /// Every status a call of row `index` can end with ([`MethodSpec::can_end_with`]).
    pub fn can_end_with(&self, index: usize) -> Vec<Status> {
        self.specs
            .get(index)
            .map_or_else(Vec::new, |s| s.can_end_with(self.narrows(index)))
    }

    /// The statuses particular to row `index` ([`MethodSpec::own_statuses`]).
    pub fn own_statuses(&self, index: usize) -> Vec<(Status, &'static str)> {
        self.specs
            .get(index)
            .map_or_else(Vec::new, |s| s.own_statuses(self.narrows(index)))
    }

    /// The plan translating row `index`'s input from `abi` to native, if it has a layout.
    pub fn inbound(&self, index: usize, abi: AbiId) -> Option<&Plan> {
        self.rows.get(index)?.inbound.as_ref()?.by_abi.get(abi as usize)
    }

    /// The plan translating row `index`'s output from native to `abi`, if it has a layout.
    pub fn outbound(&self, index: usize, abi: AbiId) -> Option<&Plan> {
        self.rows.get(index)?.outbound.as_ref()?.by_abi.get(abi as usize)
    }

    /// The table as wire descriptions, with struct sizes as a client of `abi` sees them.
    pub fn infos(&self, abi: AbiId) -> Vec<MethodInfo> {
        self.rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let r = &row.spec;
                let size = |p: Option<&Plan>, from_client: bool, native: SizeRange| match p {
                    Some(plan) => {
                        let n = u32::try_from(if from_client { plan.src_size() } else { plan.dst_size() })
                            .unwrap_or(u32::MAX);
                        pb::SizeRange { min: n, max: n }
                    }
                    None => pb::SizeRange {
                        min: native.min,
                        max: native.max,
                    },
                };
                MethodInfo {
                    selector: r.selector,
                    name: r.name.to_string(),
                    scalar_in: u32::from(r.scalar_in),
                    scalar_out: u32::from(r.scalar_out),
                    struct_in: Some(size(self.inbound(i, abi), true, r.struct_in)),
                    struct_out: Some(size(self.outbound(i, abi), false, r.struct_out)),
                    is_async: r.is_async,
                    privilege: r.privilege.unwrap_or_default().to_string(),
                    struct_in_layout: row.inbound.as_ref().map_or("", |p| p.name).to_string(),
                    struct_out_layout: row.outbound.as_ref().map_or("", |p| p.name).to_string(),
                }
            })
            .collect()
    }
}

impl MethodTable {
    /// Checks and translates a call from a client of `abi` to row `index`: the struct input is
    /// translated from the client's layout (exact size) into a zeroed native buffer; counts and
    /// bounds are checked; a layout output needs room for the client-layout size.
    pub fn prepare(
        &self,
        index: usize,
        abi: AbiId,
        scalars: Vec<u64>,
        struct_in: Vec<u8>,
        client_out_cap: u32,
    ) -> Result<CallArgs, DriverError> {
        let spec = self
            .specs
            .get(index)
            .ok_or_else(|| DriverError::new(Status::BadArgument, "no such method"))?;
        let struct_in = match self.inbound(index, abi) {
            Some(plan) => plan.translate(&struct_in)?,
            None => struct_in,
        };
        let mut args = spec.check_args(scalars, struct_in, client_out_cap)?;
        if let Some(plan) = self.outbound(index, abi) {
            if (client_out_cap as usize) < plan.dst_size() {
                return Err(DriverError::new(
                    Status::BadArgument,
                    format!(
                        "{} needs {} output bytes in this ABI, the caller accepts {client_out_cap}",
                        spec.name,
                        plan.dst_size()
                    ),
                ));
            }
            args.struct_out_cap = spec.struct_out.max as usize;
        }
        Ok(args)
    }

    /// Checks a driver's output for row `index` against the table and `cap`, and translates a
    /// layout output into the client's layout (narrowing that loses data is `Overflow`).
    /// A driver's error passes only with a status the row lists ([`MethodSpec::contract`]).
    pub fn finish(
        &self,
        index: usize,
        abi: AbiId,
        result: Result<CallOutput, DriverError>,
        cap: usize,
    ) -> Result<CallOutput, DriverError> {
        let spec = self
            .specs
            .get(index)
            .ok_or_else(|| DriverError::new(Status::Internal, "no such method"))?;
        let out = result.map_err(|e| spec.contract(e, self.narrows(index)))?;
        spec.check_output(&out, cap)?;
        match self.outbound(index, abi) {
            Some(plan) => Ok(CallOutput {
                struct_out: plan.translate(&out.struct_out)?,
                scalars: out.scalars,
            }),
            None => Ok(out),
        }
    }
}

impl From<TranslateError> for DriverError {
    fn from(e: TranslateError) -> DriverError {
        let status = match e {
            TranslateError::Overflow { .. } => Status::Overflow,
            TranslateError::Size { .. } | TranslateError::Bool { .. } => Status::BadArgument,
        };
        DriverError::new(status, e.to_string())
    }
}

impl MethodSpec {
    /// The statuses any call can end with, whatever its method, and what each means: success,
    /// and what the session checks before and around the driver.
    pub const EVERY_CALL: [(Status, &'static str); 9] = [
        (Status::Success, "it ran"),
        (
            Status::BadArgument,
            "a count, size or limit outside the method's contract (it did not run)",
        ),
        (
            Status::NotPrivileged,
            "policy refuses the method, its arguments or its privilege",
        ),
        (Status::NoDevice, "the device went away"),
        (
            Status::NoMemory,
            "a resource limit of the session or its user (pending calls, unread messages)",
        ),
        (Status::RateLimited, "the grant's rate limit"),
        (Status::NotOpen, "the handle is not open in this connection"),
        (Status::Internal, "a fault in the broker or the driver"),
        (
            Status::Asleep,
            "the devices were asleep and did not wake within the broker's wait (it did not run)",
        ),
    ];

    /// What `ABORTED` means for a method that completes later.
    pub const ABORTED: &'static str = "its user client closed, or the device was terminated, first";

    /// What `OVERFLOW` means for a method whose output has a layout.
    pub const OVERFLOW: &'static str =
        "it ran: a value it returned does not fit this ABI's type, so the output is withheld";

    /// Statuses only the session or the transport ends a call with; no driver row may list them.
    pub const SESSION_ONLY: [Status; 6] = [
        Status::Success,
        Status::NotPrivileged,
        Status::RateLimited,
        Status::NotOpen,
        Status::ProtocolError,
        Status::ExclusiveAccess,
    ];

    /// Every status a call of this method can end with, in number order: [`Self::EVERY_CALL`],
    /// `ABORTED` when it completes later (its user client may close first), `OVERFLOW` when its
    /// output `narrows` on some ABI (a value that may not fit the caller's type), and the
    /// driver's own. [`MethodTable::can_end_with`] knows `narrows` from its plans.
    pub fn can_end_with(&self, narrows: bool) -> Vec<Status> {
        let own = self.own_statuses(narrows);
        Status::ALL
            .into_iter()
            .filter(|s| MethodSpec::EVERY_CALL.iter().any(|(every, _)| every == s) || own.iter().any(|(o, _)| o == s))
            .collect()
    }

    /// The statuses particular to this method, beyond [`Self::EVERY_CALL`], each with what it
    /// means here: the row's own, then `ABORTED` and `OVERFLOW` where what the method is implies
    /// them (unless the row says what they mean itself).
    pub fn own_statuses(&self, narrows: bool) -> Vec<(Status, &'static str)> {
        let mut own = self.statuses.to_vec();
        let listed = |own: &[(Status, &str)], s| own.iter().any(|(o, _)| *o == s);
        if self.is_async && !listed(&own, Status::Aborted) {
            own.push((Status::Aborted, MethodSpec::ABORTED));
        }
        if narrows && !listed(&own, Status::Overflow) {
            own.push((Status::Overflow, MethodSpec::OVERFLOW));
        }
        own
    }

    /// The driver's error, if its status is in this method's contract; otherwise `INTERNAL`,
    /// logged as the driver bug it is.
    fn contract(&self, e: DriverError, narrows: bool) -> DriverError {
        if self.can_end_with(narrows).contains(&e.status) {
            return e;
        }
        tracing::error!(
            method = self.name,
            status = e.status.name(),
            message = %e.message,
            "a driver ended a call with a status its method table does not list: reported as INTERNAL"
        );
        DriverError::new(
            Status::Internal,
            format!(
                "{}: the driver ended the call with {}, which its contract does not list ({})",
                self.name,
                e.status.name(),
                e.message
            ),
        )
    }

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
        for (name, max) in self.scalar_max {
            let value = self
                .scalar_names
                .iter()
                .position(|n| n == name)
                .and_then(|i| scalars.get(i));
            if let Some(value) = value
                && value > max
            {
                return Err(DriverError::new(
                    Status::BadArgument,
                    format!("{} {name} {value}: at most {max}", self.name),
                ));
            }
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
        in_layout: None,
        out_layout: None,
        scalar_names: &["a", "b"],
        scalar_max: &[],
        statuses: &[],
    };

    #[test]
    fn table_selectors_must_ascend_and_may_skip() {
        let seven = MethodSpec {
            selector: 7,
            name: "seven",
            ..ADD
        };
        let table = MethodTable::new(&[ADD, seven]).unwrap();
        assert_eq!(table.get(7).map(|(i, s)| (i, s.name)), Some((1, "seven")));
        assert!(table.get(6).is_none());
        assert!(matches!(
            MethodTable::new(&[seven, ADD]),
            Err(TableError::SelectorOrder { .. })
        ));
        let twin = MethodSpec { name: "twin", ..ADD };
        assert!(matches!(
            MethodTable::new(&[ADD, twin]),
            Err(TableError::SelectorOrder { .. })
        ));
    }

    #[test]
    fn table_layout_rows_get_sizes_and_plans_per_abi() {
        let schema = Schema::from_toml(
            "[[struct]]\nname = \"t\"\nfields = [{name=\"a\",type=\"u32\"},{name=\"b\",type=\"c_long\"}]\n",
        )
        .unwrap();
        let row = MethodSpec {
            scalar_in: 0,
            scalar_out: 0,
            in_layout: Some("t"),
            out_layout: Some("t"),
            scalar_names: &[],
            ..ADD
        };
        let table = MethodTable::with_schema(&[row], &schema).unwrap();
        // Its parameters: the struct's length and its integer fields, at native offsets.
        let params: Vec<&str> = table.params(0).iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(params, ["len", "a", "b"]);
        let native = schema.layout(0, AbiId::native().abi()).size;
        assert_eq!(table.rows()[0].struct_in, SizeRange::exactly(native));
        assert_eq!(table.inbound(0, AbiId::I386).unwrap().src_size(), 8);
        assert_eq!(table.outbound(0, AbiId::I386).unwrap().dst_size(), 8);
        let info = &table.infos(AbiId::I386)[0];
        assert_eq!((info.struct_in.unwrap().max, info.struct_in_layout.as_str()), (8, "t"));
        let bad = MethodSpec {
            in_layout: Some("nope"),
            ..row
        };
        assert!(matches!(
            MethodTable::with_schema(&[bad], &schema),
            Err(TableError::UnknownLayout { .. })
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
    fn scalar_limits_name_real_scalars_and_refuse_larger_values_before_the_driver() {
        let bad = MethodSpec {
            scalar_max: &[("c", 1)],
            ..ADD
        };
        assert_eq!(
            MethodTable::new(&[bad]).unwrap_err(),
            TableError::UnknownLimit {
                name: "add",
                scalar: "c"
            }
        );
        let limited = MethodSpec {
            scalar_max: &[("b", 10)],
            ..ADD
        };
        assert!(MethodTable::new(&[limited]).is_ok());
        assert!(
            limited.check_args(vec![u64::MAX, 10], vec![], 0).is_ok(),
            "a is not limited; 10 is"
        );
        let e = limited.check_args(vec![0, 11], vec![], 0).unwrap_err();
        assert_eq!(e.status, Status::BadArgument);
        assert_eq!(e.message, "add b 11: at most 10");
    }

    #[test]
    fn table_scalars_must_be_named() {
        let unnamed = MethodSpec {
            scalar_names: &["a"],
            ..ADD
        };
        assert_eq!(
            MethodTable::new(&[unnamed]).unwrap_err(),
            TableError::ScalarNames("add")
        );
        let table = MethodTable::new(&[ADD]).unwrap();
        assert_eq!(
            table.params(0).iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
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

    #[test]
    fn table_statuses_are_listed_once_and_never_the_sessions() {
        const SESSIONS: [&[(Status, &str)]; 4] = [
            &[(Status::Success, "x")],
            &[(Status::NotOpen, "x")],
            &[(Status::RateLimited, "x")],
            &[(Status::NotPrivileged, "x")],
        ];
        for statuses in SESSIONS {
            let row = MethodSpec { statuses, ..ADD };
            let status = statuses[0].0;
            assert_eq!(
                MethodTable::new(&[row]).unwrap_err(),
                TableError::BadStatus { name: "add", status }
            );
        }
        let twice = MethodSpec {
            statuses: &[(Status::Timeout, "a"), (Status::Timeout, "b")],
            ..ADD
        };
        assert_eq!(
            MethodTable::new(&[twice]).unwrap_err(),
            TableError::BadStatus {
                name: "add",
                status: Status::Timeout
            }
        );
    }

    #[test]
    fn a_driver_status_outside_the_methods_contract_becomes_internal() {
        let waits = MethodSpec {
            is_async: true,
            statuses: &[(Status::Timeout, "nothing happened in time")],
            ..ADD
        };
        let table = MethodTable::new(&[
            ADD,
            MethodSpec {
                selector: 1,
                name: "waits",
                ..waits
            },
        ])
        .unwrap();
        let abi = AbiId::native();
        let end = |index: usize, status: Status| {
            table
                .finish(index, abi, Err(DriverError::new(status, "why")), 0)
                .unwrap_err()
                .status
        };
        // Listed by the row, or implied by what the method is: passed on.
        assert_eq!(end(1, Status::Timeout), Status::Timeout);
        assert_eq!(end(1, Status::Aborted), Status::Aborted, "it completes later");
        assert_eq!(end(0, Status::NoDevice), Status::NoDevice, "every call");
        // Not in the contract: a driver bug, reported as one.
        assert_eq!(end(0, Status::Timeout), Status::Internal);
        assert_eq!(end(0, Status::Aborted), Status::Internal, "add completes at once");
        assert_eq!(end(1, Status::Unsupported), Status::Internal);
        let e = table
            .finish(0, abi, Err(DriverError::new(Status::NotWritable, "why")), 0)
            .unwrap_err();
        assert!(
            e.message.contains("NOT_WRITABLE") && e.message.contains("does not list"),
            "{}",
            e.message
        );
        assert_eq!(
            table.can_end_with(1),
            [
                Status::Success,
                Status::BadArgument,
                Status::NotPrivileged,
                Status::NoDevice,
                Status::NoMemory,
                Status::Timeout,
                Status::Aborted,
                Status::RateLimited,
                Status::NotOpen,
                Status::Internal,
                Status::Asleep
            ]
        );
    }
}
