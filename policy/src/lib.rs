//! The Portcullis policy language (v1): principals and rules in TOML, compiled at admission
//! into a [`Grant`] so that a per-call check is a table lookup.
//!
//! Pure: sources come in as text, decisions go out as values. Loading files, watching them and
//! logging decisions belong to the broker.
//!
//! Semantics, in order of precedence:
//! - **forbid wins**: a matching `forbid` rule overrides every `allow`;
//! - **default deny**: what no `allow` rule grants is refused, and the refusal says so;
//! - a forbid rule's scope is what it names: methods, exclusive opens, privileges, or — when it
//!   names none of these — the whole service (which the task then cannot see either).

#![forbid(unsafe_code)]

mod analysis;
mod args;
mod explain;
mod format;
#[doc(hidden)]
pub mod fuzzing;
mod grant;
mod index;
mod lint;
mod model;
mod reference;
#[cfg(test)]
mod testgen;

pub use analysis::{Change, Question, Reach, TaskParts, TooHard, World, diff};
pub use args::{ParamAt, ParamRef};
pub use explain::{Explanation, RuleTrace};
pub use format::format;
pub use grant::{Admission, Decision, Denial, Grant, MethodDecision, MethodRef, Remote, RuleRef, ServiceView, Task};
pub use index::PrincipalSet;
pub use model::{
    Catalog, ClassNames, Effect, Mode, OpenPermission, Policy, PolicyError, PropMatch, Rate, Source, SourceError,
    did_you_mean, locate_in, prop_value,
};
pub use reference::Request;

/// What a denial names when no rule decided it.
pub const DEFAULT_DENY: &str = "default deny";
