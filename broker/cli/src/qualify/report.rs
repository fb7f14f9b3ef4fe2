//! What qualify tells: progress while it runs (a bar on a terminal, plain lines otherwise),
//! the table per transition, the plot, and what changed since an earlier record.

use std::{
    io::IsTerminal,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use super::{COUNTERS, Record};

/// Progress over every cycle of every transition.
pub(super) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: AtomicU64,
}

impl Progress {
    pub(super) fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>8} [{bar:40}] {pos}/{len} cycles, {elapsed} ({eta} left)",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            bar,
            total,
            done: AtomicU64::new(0),
        }
    }

    pub(super) fn begin(&self, transition: &str) {
        match &self.bar {
            Some(bar) => bar.set_prefix(transition.to_string()),
            None => eprintln!("qualify: {transition} ..."),
        }
    }

    pub(super) fn advance(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        match &self.bar {
            Some(bar) => bar.inc(1),
            None if done.is_multiple_of(250) => eprintln!("qualify: {done}/{} cycles", self.total),
            None => {}
        }
    }

    pub(super) fn skip(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The table: per transition, its cycles and time, and each counter's start, end, peak and
/// verdict; then the install checklist and the outcome.
pub(super) fn print(record: &Record) {
    for t in &record.transitions {
        let per = if t.cycles > 0 {
            t.seconds * 1e3 / t.cycles as f64
        } else {
            0.0
        };
        println!(
            "\n{}: {} cycles in {:.1} s ({per:.2} ms each){}",
            t.name,
            t.cycles,
            t.seconds,
            if t.refused > 0 {
                format!(", {} requests refused as the policy or arbitration may", t.refused)
            } else {
                String::new()
            }
        );
        if let Some(e) = &t.error {
            println!("  FAILED: {e}");
        }
        println!("  {:<16}{:>14}{:>14}{:>14}  verdict", "counter", "start", "end", "peak");
        for counter in COUNTERS {
            let Some(v) = t.verdicts.get(counter.name) else {
                continue;
            };
            println!(
                "  {:<16}{:>14}{:>14}{:>14}  {}{}",
                counter.name,
                v.start,
                v.end,
                v.peak,
                v.verdict,
                if v.passed { "" } else { "  <-- FAILED" }
            );
        }
    }
    if !record.install.is_empty() {
        println!("\ninstall checklist:");
        for c in &record.install {
            println!("  [{}] {}: {}", if c.ok { "ok" } else { "FAIL" }, c.item, c.detail);
        }
    }
    let failed: Vec<String> = record
        .transitions
        .iter()
        .flat_map(|t| {
            let errors = t.error.iter().map(move |e| format!("{}: {e}", t.name));
            let ramps = t
                .verdicts
                .iter()
                .filter(|(_, v)| !v.passed)
                .map(move |(c, v)| format!("{}: {c} {}", t.name, v.verdict));
            errors.chain(ramps)
        })
        .collect();
    if record.passed {
        println!(
            "\nqualification passed: {} transitions, no counter ramps",
            record.transitions.len()
        );
    } else {
        println!("\nqualification FAILED:");
        for f in &failed {
            println!("  {f}");
        }
        for c in record.install.iter().filter(|c| !c.ok) {
            println!("  install: {}: {}", c.item, c.detail);
        }
    }
}

/// What changed since `old`: time per cycle, each counter's growth over a transition, and
/// verdicts that changed.
pub(super) fn compare(old: &Record, new: &Record) {
    println!(
        "\ncompared with the record of {} (version {}, {} cycles):",
        old.time, old.broker_version, old.cycles
    );
    let mut said = 0;
    for t in &new.transitions {
        let Some(o) = old.transitions.iter().find(|o| o.name == t.name) else {
            println!("  {}: new transition", t.name);
            said += 1;
            continue;
        };
        let per = |r: &super::TransitionRecord| r.seconds * 1e3 / r.cycles.max(1) as f64;
        let (was, now) = (per(o), per(t));
        if was > 0.0 && ((now / was) > 1.25 || (now / was) < 0.8) {
            println!("  {}: {was:.2} -> {now:.2} ms a cycle ({:.2}x)", t.name, now / was);
            said += 1;
        }
        for (name, v) in &t.verdicts {
            let Some(ov) = o.verdicts.get(name) else { continue };
            let (grew_then, grew_now) = (ov.end as i64 - ov.start as i64, v.end as i64 - v.start as i64);
            if ov.passed != v.passed {
                println!("  {}: {name}: {} -> {}", t.name, ov.verdict, v.verdict);
                said += 1;
            } else if grew_then != grew_now && name != "rss_bytes" && name != "threads" {
                println!("  {}: {name} grew {grew_then} then, {grew_now} now", t.name);
                said += 1;
            }
        }
    }
    for o in &old.transitions {
        if !new.transitions.iter().any(|t| t.name == o.name) {
            println!("  {}: not run this time", o.name);
            said += 1;
        }
    }
    if said == 0 {
        println!("  nothing changed: same verdicts, same growth, time per cycle within 0.8-1.25x");
    }
}

/// A sample on the plot's x axis: the cycle over all transitions, and the counters.
type Point<'a> = (u64, &'a std::collections::BTreeMap<String, u64>);

/// A value as an axis shows it: 18.4M, 2.5k, 12.
fn compact(v: f64) -> String {
    match v.abs() {
        a if a >= 1e6 => format!("{:.1}M", v / 1e6),
        a if a >= 1e4 => format!("{:.0}k", v / 1e3),
        _ => format!("{v:.0}"),
    }
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Every counter over the cycles of every transition, one small chart each, transitions one
/// after the other along the x axis.
pub(super) fn plot(record: &Record, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let font = std::fs::read(FONT).map_err(|e| format!("{FONT} (Debian's fonts-dejavu-core) for the plot: {e}"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| "the plot's font could not be registered".to_string())?;
    let root = BitMapBackend::new(path, (1600, 1200)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let title = format!(
        "portcullis qualify: {} cycles per transition ({})",
        record.cycles,
        record
            .transitions
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let root = root.titled(&title, ("sans-serif", 22)).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((4, 4));
    // Each transition's samples laid end to end.
    let mut offset = 0u64;
    let mut series: Vec<(String, Vec<Point<'_>>)> = Vec::new();
    for t in &record.transitions {
        series.push((
            t.name.clone(),
            t.samples.iter().map(|s| (offset + s.cycle, &s.counters)).collect(),
        ));
        offset += t.cycles.max(1);
    }
    for (panel, counter) in panels.iter().zip(COUNTERS.iter()) {
        let values = series
            .iter()
            .flat_map(|(_, s)| s.iter().map(|(_, c)| c.get(counter.name).copied().unwrap_or(0)));
        let top = values.max().unwrap_or(0).max(1) as f64 * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(counter.name, ("sans-serif", 16))
            .margin(6)
            .x_label_area_size(22)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..offset.max(1) as f64, 0f64..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_labels(4)
            .y_labels(4)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| compact(*v))
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (_, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points
                        .iter()
                        .map(|(x, c)| (*x as f64, c.get(counter.name).copied().unwrap_or(0) as f64)),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?;
        }
    }
    // The legend: which color is which transition, in the last panel.
    if let Some(panel) = panels.get(COUNTERS.len()) {
        for (i, (name, _)) in series.iter().enumerate() {
            let y = 20 + i as i32 * 22;
            panel
                .draw(&Text::new(
                    format!("— {name}"),
                    (20, y),
                    ("sans-serif", 16).into_font().color(&Palette99::pick(i)),
                ))
                .map_err(|e| e.to_string())?;
        }
    }
    root.present().map_err(|e| e.to_string())
}
