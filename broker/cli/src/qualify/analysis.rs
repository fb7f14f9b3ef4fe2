//! Whether a counter ramps over the cycles of a transition: pure arithmetic on the samples, so
//! that it is tested on its own.
//!
//! A leak is a counter that grows with the cycles and keeps growing; a cache or a pool that
//! fills and stays full is a plateau, and allocator or thread-pool jitter is noise. So:
//!
//! - an **exact** counter (sessions, user clients, mappings, rings, opens, pending calls,
//!   connections …) is sampled when qualify holds nothing: it must end where it started once
//!   the broker has settled, and any object more is a leak;
//! - any counter **ramps** when the least-squares slope of the *second half* of its samples,
//!   carried over that half's cycles, grows it by more than its tolerance, its slope over the
//!   whole run is positive, and it ends more than the tolerance above where it started. A
//!   plateau has a flat second half; noise stays within the tolerance.

/// A counter's verdict over one transition.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Verdict {
    /// No growth beyond its tolerance.
    Steady,
    /// It ended above where it started (an exact counter: objects left behind).
    NotBack {
        /// Before the first cycle.
        start: f64,
        /// After the last, settled.
        end: f64,
    },
    /// It grows with the cycles.
    Ramps {
        /// Growth per 1,000 cycles, from the second half's slope.
        per_1000: f64,
        /// Before the first cycle.
        start: f64,
        /// After the last.
        end: f64,
    },
}

impl Verdict {
    /// Whether the counter passes.
    pub(crate) fn passed(&self) -> bool {
        *self == Verdict::Steady
    }

    /// In words, for the report.
    pub(crate) fn describe(&self) -> String {
        match self {
            Verdict::Steady => "steady".into(),
            Verdict::NotBack { start, end } => format!("not back: {start} -> {end}"),
            Verdict::Ramps { per_1000, start, end } => {
                format!("RAMPS: {start} -> {end}, +{per_1000:.1} per 1000 cycles")
            }
        }
    }
}

/// The least-squares slope of `points` (cycle, value); 0 for fewer than two distinct cycles.
pub(crate) fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx == 0.0 {
        return 0.0;
    }
    points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum::<f64>() / sxx
}

/// Judges one counter: `points` are (cycle, value), the first before any cycle and the last
/// after the last cycle, settled; `tolerance` is the growth that is still noise.
pub(crate) fn judge(points: &[(f64, f64)], tolerance: f64, exact: bool) -> Verdict {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return Verdict::Steady;
    };
    let (start, end) = (first.1, last.1);
    let second = points.get(points.len() / 2..).unwrap_or_default();
    let span = second.last().map_or(0.0, |l| l.0) - second.first().map_or(0.0, |f| f.0);
    let late = slope(second);
    // An exact counter ramps when it grows by more than one object over the second half; one
    // object left at the end is "not back".
    let ramp = if exact { tolerance.max(1.0) } else { tolerance };
    if points.len() >= 6 && late * span > ramp && slope(points) > 0.0 && end - start > ramp {
        return Verdict::Ramps {
            per_1000: late * 1000.0,
            start,
            end,
        };
    }
    if exact && end > start {
        return Verdict::NotBack { start, end };
    }
    Verdict::Steady
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(f: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        (0..=50).map(|i| f64::from(i) * 20.0).map(|x| (x, f(x))).collect()
    }

    #[test]
    fn judge_a_steady_leak_ramps() {
        // One descriptor every 10 cycles.
        let v = judge(&series(|x| 40.0 + (x / 10.0).floor()), 2.0, false);
        assert!(
            matches!(v, Verdict::Ramps { per_1000, .. } if (per_1000 - 100.0).abs() < 5.0),
            "{v:?}"
        );
    }

    #[test]
    fn judge_a_plateau_is_steady() {
        // A pool that fills in the first 200 cycles and stays full.
        let v = judge(&series(|x| 6.0 + (x / 50.0).min(4.0).floor()), 2.0, false);
        assert_eq!(v, Verdict::Steady);
    }

    #[test]
    fn judge_noise_within_tolerance_is_steady() {
        let jitter = |x: f64| 16_000_000.0 + ((x * 7.0) % 13.0) * 50_000.0;
        assert_eq!(judge(&series(jitter), 2_000_000.0, false), Verdict::Steady);
    }

    #[test]
    fn judge_memory_that_grows_past_its_tolerance_ramps() {
        // 8 KiB a cycle: 8 MB over 1,000 cycles.
        let v = judge(&series(|x| 16_000_000.0 + x * 8192.0), 2_000_000.0, false);
        assert!(matches!(v, Verdict::Ramps { .. }), "{v:?}");
    }

    #[test]
    fn judge_an_exact_counter_left_above_its_start_is_not_back() {
        let mut points = series(|_| 0.0);
        if let Some(last) = points.last_mut() {
            last.1 = 1.0;
        }
        assert_eq!(judge(&points, 0.0, true), Verdict::NotBack { start: 0.0, end: 1.0 });
        // The same counter back at its start passes, however high it went meanwhile.
        let mut busy = series(|x| if x > 0.0 && x < 1000.0 { 3.0 } else { 0.0 });
        if let Some(last) = busy.last_mut() {
            last.1 = 0.0;
        }
        assert_eq!(judge(&busy, 0.0, true), Verdict::Steady);
    }

    #[test]
    fn judge_an_exact_counter_that_grows_with_the_cycles_ramps() {
        // A session left behind every 100 cycles.
        let v = judge(&series(|x| (x / 100.0).floor()), 0.0, true);
        assert!(
            matches!(v, Verdict::Ramps { per_1000, .. } if (per_1000 - 10.0).abs() < 1.0),
            "{v:?}"
        );
    }

    #[test]
    fn judge_a_counter_that_falls_is_steady() {
        assert_eq!(judge(&series(|x| 1000.0 - x / 10.0), 0.0, true), Verdict::Steady);
    }

    #[test]
    fn slope_of_a_line_is_its_slope() {
        assert!((slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 1.0)]), 0.0);
    }
}
