//! Draws the chart of `docs/benchmarks.md` from the JSON that `bench/run.sh`
//! writes: one group of horizontal bars per workload, one bar per file
//! system, each bar the system's cost relative to native (its median time
//! over native's median time; for rates such as MB/s and IOPS, native's rate
//! over the system's rate), on a logarithmic axis so that 2x and 20x are
//! both readable. Native itself is the vertical line at 1.
//!
//! Usage: `keibi-bench-chart RESULTS.json OUT.svg`
//!
//! Only the fields read here are part of the contract with run.sh:
//! `systems` (names, native first) and `workloads[]` with `label`,
//! `higher_is_better` and `median` (system name to number or null when the
//! workload failed or was not run there).

use std::collections::BTreeMap;
use std::error::Error;
use std::process::ExitCode;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::Deserialize;

#[derive(Deserialize)]
struct Results {
    systems: Vec<String>,
    workloads: Vec<Workload>,
}

#[derive(Deserialize)]
struct Workload {
    label: String,
    higher_is_better: bool,
    median: BTreeMap<String, Option<f64>>,
}

/// One colour per system other than native, in the order of `systems`.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// The cost of `system` relative to native for one workload, if both ran.
fn cost_ratio(w: &Workload, native: &str, system: &str) -> Option<f64> {
    let n = (*w.median.get(native)?)?;
    let s = (*w.median.get(system)?)?;
    if n <= 0.0 || s <= 0.0 {
        return None;
    }
    Some(if w.higher_is_better { n / s } else { s / n })
}

fn draw(results: &Results, out: &str) -> Result<(), Box<dyn Error>> {
    let native = results
        .systems
        .first()
        .ok_or("the results name no systems")?
        .clone();
    let others: Vec<&String> = results.systems.iter().skip(1).collect();
    let rows = results.workloads.len();
    if rows == 0 || others.is_empty() {
        return Err("the results have no workloads or only one system".into());
    }
    let ratios: Vec<Vec<Option<f64>>> = results
        .workloads
        .iter()
        .map(|w| others.iter().map(|s| cost_ratio(w, &native, s)).collect())
        .collect();
    let all = ratios.iter().flatten().flatten().copied();
    let max = all.clone().fold(1.0_f64, f64::max);
    let min = all.fold(1.0_f64, f64::min);
    // Whole decades, with room right of the longest bar for its label.
    let x_lo = 10f64.powf((min.log10() - 0.05).floor()).min(0.1);
    let x_hi = 10f64.powf((max.log10() + 0.35).ceil());

    let bar_h = 14u32;
    let group_h = bar_h * others.len() as u32 + 16;
    let label_w = 330u32;
    let height = group_h * rows as u32 + 130;
    let width = 1100u32;

    let root = SVGBackend::new(out, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("cost relative to {native} (log scale; lower is better; {native} = 1)"),
            ("sans-serif", 18),
        )
        .margin(12)
        .margin_left(label_w)
        .x_label_area_size(36)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), 0f64..rows as f64)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc(format!(
            "system / {native} (time ratio; for MB/s and IOPS the inverse)"
        ))
        .x_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}x")
            } else {
                format!("{v}x")
            }
        })
        .draw()?;

    // Row r occupies y in [rows - r - 1, rows - r]: the first workload on top.
    let slot = |r: usize, i: usize| {
        let top = (rows - r) as f64 - 8.0 / group_h as f64;
        let step = bar_h as f64 / group_h as f64;
        (top - step * (i as f64 + 1.0), top - step * i as f64)
    };
    for (i, system) in others.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let bars: Vec<(usize, f64)> = ratios
            .iter()
            .enumerate()
            .filter_map(|(r, row)| row[i].map(|v| (r, v)))
            .collect();
        chart
            .draw_series(bars.iter().map(|&(r, v)| {
                let (y0, y1) = slot(r, i);
                Rectangle::new([(x_lo, y0 + 0.01), (v, y1 - 0.01)], colour.filled())
            }))?
            .label(system.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
        chart.draw_series(bars.iter().map(|&(r, v)| {
            let (y0, y1) = slot(r, i);
            Text::new(
                format!(" {}", fmt_ratio(v)),
                (v, (y0 + y1) / 2.0),
                ("sans-serif", 11)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            )
        }))?;
        // A failed or missing measurement is said, not left blank.
        chart.draw_series(
            ratios
                .iter()
                .enumerate()
                .filter(|(_, row)| row[i].is_none())
                .map(|(r, _)| {
                    let (y0, y1) = slot(r, i);
                    Text::new(
                        format!(" {system}: no result"),
                        (x_lo, (y0 + y1) / 2.0),
                        ("sans-serif", 11)
                            .into_font()
                            .color(&RED)
                            .pos(Pos::new(HPos::Left, VPos::Center)),
                    )
                }),
        )?;
    }
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(1.0, 0.0), (1.0, rows as f64)],
        BLACK.stroke_width(2),
    )))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;

    // Workload names left of the plotting area, at each group's centre.
    for (r, w) in results.workloads.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(x_lo, (rows - r) as f64 - 0.5));
        root.draw(&Text::new(
            w.label.clone(),
            (px - 10, py),
            ("sans-serif", 13)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
    root.present()?;
    Ok(())
}

fn fmt_ratio(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}x")
    } else {
        format!("{v:.2}x")
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output] = args.as_slice() else {
        return Err("usage: keibi-bench-chart RESULTS.json OUT.svg".into());
    };
    let text = std::fs::read_to_string(input).map_err(|e| format!("cannot read {input}: {e}"))?;
    let results: Results =
        serde_json::from_str(&text).map_err(|e| format!("{input} is not run.sh's JSON: {e}"))?;
    draw(&results, output).map_err(|e| format!("cannot draw {output}: {e}").into())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keibi-bench-chart: {e}");
            ExitCode::FAILURE
        }
    }
}
