//! Line plots drawn on the server: values over time become SVG path data
//! and axis ticks that the page's template lays out, plus the same
//! figures as text (latest, min, max) for screen readers and `curl`.
//! No script, no font and nothing from elsewhere, so the page works
//! offline.

use serde::Serialize;

/// The drawing's size in SVG units (it scales to the page's width).
pub const WIDTH: f64 = 640.0;
pub const HEIGHT: f64 = 170.0;
/// Room for the y labels on the left and the x labels below.
pub const LEFT: f64 = 64.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 8.0;
const BOTTOM: f64 = 22.0;

/// How a plot's values read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Bytes,
    Millis,
    /// A fraction shown as a percentage.
    Ratio,
}

impl Unit {
    pub fn show(self, v: f64) -> String {
        match self {
            Unit::Count => format!("{}", v.round() as u64),
            Unit::Bytes => super::format::bytes(v.max(0.0) as u64),
            Unit::Millis => super::format::millis(v.max(0.0) as u64),
            Unit::Ratio => format!("{:.0} %", v * 100.0),
        }
    }
}

/// One line of a plot: its values, one per point in time (`None`: no
/// value there, and a gap in the line).
pub struct LineData {
    pub label: &'static str,
    /// A CSS class: `series-a`, `-b`, `-c` (colours) or `series-limit`
    /// (dashed).
    pub class: &'static str,
    pub values: Vec<Option<f64>>,
}

/// A line as drawn, with its text equivalent.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub label: &'static str,
    #[serde(skip)]
    pub class: &'static str,
    /// SVG path data: `M x y L x y ...`, a new `M` after each gap.
    #[serde(skip)]
    pub path: String,
    /// Values drawn.
    pub points: usize,
    /// The last value drawn, and the extremes, as the page shows them;
    /// `None` with no value at all.
    pub latest: Option<String>,
    pub min: Option<String>,
    pub max: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tick {
    /// Position along its axis, in SVG units.
    pub at: f64,
    pub label: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plot {
    /// An HTML id (fixed, ASCII).
    pub id: &'static str,
    pub title: String,
    pub lines: Vec<Line>,
    #[serde(skip)]
    pub y_ticks: Vec<Tick>,
    #[serde(skip)]
    pub x_ticks: Vec<Tick>,
    /// A sentence under the plot (a projection), if any.
    pub note: Option<String>,
}

/// The smallest "round" number (1, 2 or 5 times a power of ten) at or
/// above `v`, so the top gridline has a readable label.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if step * power >= v {
            return step * power;
        }
    }
    10.0 * power
}

/// A y coordinate with one decimal: enough on a 170-unit drawing, and
/// short, since a page holds thousands of them.
fn coord(v: f64) -> String {
    format!("{:.1}", v)
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_owned()
}

fn summary(unit: Unit, values: &[Option<f64>]) -> (Option<String>, Option<String>, Option<String>) {
    let present: Vec<f64> = values.iter().flatten().copied().collect();
    let latest = present.last().map(|&v| unit.show(v));
    let min = present
        .iter()
        .copied()
        .reduce(f64::min)
        .map(|v| unit.show(v));
    let max = present
        .iter()
        .copied()
        .reduce(f64::max)
        .map(|v| unit.show(v));
    (latest, min, max)
}

/// Lays out `lines` over time: the i-th value of each line is at
/// `starts[i]`; `x_labels` names some of those times.
pub fn plot(
    id: &'static str,
    title: String,
    unit: Unit,
    starts: &[u64],
    lines: Vec<LineData>,
    x_label: impl Fn(u64) -> String,
) -> Plot {
    let n = starts.len().max(2);
    let top = lines
        .iter()
        .flat_map(|l| l.values.iter().flatten().copied())
        .fold(0.0, f64::max);
    let y_max = match unit {
        Unit::Ratio => 1.0,
        // Round in binary units, as the labels are.
        Unit::Bytes => {
            let mut scale = 1.0;
            while top / scale >= 1024.0 {
                scale *= 1024.0;
            }
            nice_ceiling(top / scale) * scale
        }
        // At least 2, so the middle gridline is a whole count.
        Unit::Count => nice_ceiling(top).max(2.0),
        Unit::Millis => nice_ceiling(top),
    };
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |i: usize| LEFT + plot_w * i as f64 / (n - 1) as f64;
    let y = |v: f64| TOP + plot_h * (1.0 - (v / y_max).clamp(0.0, 1.0));
    let drawn = lines
        .into_iter()
        .map(|l| {
            let mut path = String::new();
            // Points in the segment being drawn; a lone point gets a dot
            // (a tiny stroke with round caps), or it would not show.
            let mut segment = 0;
            let mut points = 0;
            for (i, v) in l.values.iter().chain([&None]).enumerate() {
                match v {
                    Some(v) => {
                        path.push(if segment > 0 { 'L' } else { 'M' });
                        path.push_str(&coord(x(i)));
                        path.push(' ');
                        path.push_str(&coord(y(*v)));
                        segment += 1;
                        points += 1;
                    }
                    None => {
                        if segment == 1 {
                            path.push_str("h1");
                        }
                        segment = 0;
                    }
                }
            }
            let (latest, min, max) = summary(unit, &l.values);
            Line {
                label: l.label,
                class: l.class,
                path,
                points,
                latest,
                min,
                max,
            }
        })
        .collect();
    let y_ticks = [0.0, 0.5, 1.0]
        .into_iter()
        .map(|f| Tick {
            at: y(y_max * f),
            label: unit.show(y_max * f),
        })
        .collect();
    let x_ticks = [0, starts.len() / 2, starts.len().saturating_sub(1)]
        .into_iter()
        .filter_map(|i| {
            starts.get(i).map(|&t| Tick {
                at: x(i),
                label: x_label(t),
            })
        })
        .collect();
    Plot {
        id,
        title,
        lines: drawn,
        y_ticks,
        x_ticks,
        note: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_break_at_gaps_and_summaries_name_latest_min_max() {
        let starts = [0, 60, 120, 180, 240];
        let p = plot(
            "t",
            "t".into(),
            Unit::Count,
            &starts,
            vec![LineData {
                label: "pulls",
                class: "a",
                values: vec![Some(1.0), Some(7.0), None, Some(3.0), Some(2.0)],
            }],
            |t| t.to_string(),
        );
        let line = &p.lines[0];
        assert_eq!(line.points, 4);
        assert_eq!(line.path.matches('M').count(), 2, "{}", line.path);
        assert_eq!(line.path.matches('L').count(), 2, "{}", line.path);
        assert!(!line.path.contains('h'), "no lone point: {}", line.path);
        assert_eq!(
            (
                line.latest.as_deref(),
                line.min.as_deref(),
                line.max.as_deref()
            ),
            (Some("2"), Some("1"), Some("7"))
        );
        // The top gridline is the next round number above the maximum.
        assert_eq!(p.y_ticks.last().unwrap().label, "10");
        assert_eq!(p.x_ticks.len(), 3);
        assert!(p.x_ticks.iter().all(|t| (LEFT..=WIDTH).contains(&t.at)));
    }

    #[test]
    fn ceilings_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(11.0), 20.0);
        assert_eq!(nice_ceiling(1000.0), 1000.0);
        let bytes = |top: f64| {
            let line = LineData {
                label: "b",
                class: "series-a",
                values: vec![Some(top)],
            };
            let p = plot("b", "b".into(), Unit::Bytes, &[0, 1], vec![line], |_| {
                String::new()
            });
            p.y_ticks.last().unwrap().label.clone()
        };
        assert_eq!(bytes(1_500_000_000.0), "2.0 GiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0), "5.0 MiB");
        assert_eq!(coord(12.0), "12");
        assert_eq!(coord(12.34), "12.3");
    }
}
