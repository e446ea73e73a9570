//! The picture: per workload, how much is merged, what ksmd has burnt, and which setting the
//! throttler had in force, over the same time axis.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::RunRecord;

pub const DEJAVU_SANS: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT: &str = "sans-serif";

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("reading the font {path}: {source} (Debian: apt-get install fonts-dejavu-core)")]
    Font { path: String, source: std::io::Error },
    #[error("{path} is not a font plotters can use")]
    BadFont { path: String },
    #[error("drawing {path}: {message}")]
    Draw { path: String, message: String },
}

/// Registers the font every label is drawn with; call once before [`draw`].
pub fn register_font(path: &str) -> Result<(), PlotError> {
    let bytes = std::fs::read(path).map_err(|source| PlotError::Font { path: path.into(), source })?;
    // plotters keeps fonts for the life of the program.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT, FontStyle::Normal, bytes).map_err(|_| PlotError::BadFont { path: path.into() })
}

fn color(mode: &str) -> RGBColor {
    match mode {
        "throttle" => RGBColor(214, 39, 40),
        "adaptive" => RGBColor(31, 119, 180),
        "kernel-default" => RGBColor(44, 160, 44),
        "flat-out" => RGBColor(255, 127, 14),
        "advisor" => RGBColor(148, 103, 189),
        _ => RGBColor(90, 90, 90),
    }
}

fn setting_level(s: &str) -> Option<f64> {
    Some(match s {
        "initial" | "off" => 0.0,
        "slow" => 1.0,
        "standard" => 2.0,
        "aggressive" => 3.0,
        _ => return None,
    })
}

/// One column per workload (in the order first seen), three rows: merged %, ksmd CPU-seconds
/// (log scale), and the throttler's setting.
pub fn draw(records: &[RunRecord], path: &Path, title: &str) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError::Draw { path: path.display().to_string(), message: e.to_string() };
    let mut workloads: Vec<&str> = vec![];
    for r in records {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
    }
    let cols = workloads.len().max(1);
    let root = BitMapBackend::new(path, (720 * cols as u32, 980)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(title, (FONT, 22)).map_err(|e| err(&e))?;
    let areas = root.split_evenly((3, cols));

    for (c, workload) in workloads.iter().enumerate() {
        let runs: Vec<&RunRecord> = records.iter().filter(|r| r.workload == *workload).collect();
        let window = runs.iter().map(|r| r.window_s).fold(1.0, f64::max);

        let mut merged = ChartBuilder::on(&areas[c])
            .caption(format!("{workload}: merged (pages_sharing / best possible)"), (FONT, 17))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..window, 0f64..105f64)
            .map_err(|e| err(&e))?;
        merged
            .configure_mesh()
            .x_desc("seconds since the first start")
            .y_desc("% merged")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .light_line_style(WHITE)
            .label_style((FONT, 13))
            .draw()
            .map_err(|e| err(&e))?;
        for r in &runs {
            let max = r.max_pages_sharing.max(1) as f64;
            let pts = r.samples.iter().map(|s| (s.t, 100.0 * s.pages_sharing as f64 / max));
            let col = color(&r.mode);
            merged
                .draw_series(LineSeries::new(pts, col.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(r.mode.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(3)));
        }
        merged
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;

        let top = runs.iter().flat_map(|r| r.samples.iter().map(|s| s.ksmd_cpu_ns as f64 / 1e9)).fold(1.0, f64::max);
        let mut cpu = ChartBuilder::on(&areas[cols + c])
            .caption(format!("{workload}: ksmd CPU-seconds since the first start (log)"), (FONT, 17))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d(0f64..window, (0.01f64..top * 1.5).log_scale())
            .map_err(|e| err(&e))?;
        cpu.configure_mesh()
            .x_desc("seconds since the first start")
            .y_desc("CPU-s")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y}"))
            .light_line_style(WHITE)
            .label_style((FONT, 13))
            .draw()
            .map_err(|e| err(&e))?;
        for r in &runs {
            let pts = r.samples.iter().map(|s| (s.t, (s.ksmd_cpu_ns as f64 / 1e9).max(0.01)));
            let col = color(&r.mode);
            cpu.draw_series(LineSeries::new(pts, col.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(r.mode.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(3)));
        }
        cpu.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;

        let mut setting = ChartBuilder::on(&areas[2 * cols + c])
            .caption(format!("{workload}: throttler setting (CurrentSetting)"), (FONT, 17))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..window, -0.4f64..3.4f64)
            .map_err(|e| err(&e))?;
        setting
            .configure_mesh()
            .x_desc("seconds since the first start")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(WHITE)
            .y_labels(4)
            .y_label_formatter(&|y| {
                match y.round() as i64 {
                    0 => "initial",
                    1 => "slow",
                    2 => "standard",
                    3 => "aggressive",
                    _ => "",
                }
                .to_string()
            })
            .label_style((FONT, 13))
            .draw()
            .map_err(|e| err(&e))?;
        // The two daemon modes, drawn a little apart so both show where they agree.
        for (r, offset) in runs.iter().filter_map(|r| match r.mode.as_str() {
            "throttle" => Some((r, 0.08)),
            "adaptive" => Some((r, -0.08)),
            _ => None,
        }) {
            let mut pts: Vec<(f64, f64)> = vec![];
            for s in &r.samples {
                let Some(level) = setting_level(&s.setting) else { continue };
                if let Some(&(_, prev)) = pts.last() {
                    pts.push((s.t, prev)); // a step, not a slope
                }
                pts.push((s.t, level + offset));
            }
            let col = color(&r.mode);
            setting
                .draw_series(LineSeries::new(pts, col.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(r.mode.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(3)));
        }
        setting
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
