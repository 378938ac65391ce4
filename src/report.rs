//! Reports: the per-layer reconstruction-error plot and Markdown tables.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

/// One line of a per-layer plot: a label and a value per layer.
pub struct Series {
    pub label: String,
    pub values: Vec<(usize, f64)>,
}

/// Each layer's output error (`output_rel_error`) from a `report.json`.
pub fn layer_errors(report: &serde_json::Value) -> Vec<(usize, f64)> {
    report["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| Some((l["layer"].as_u64()? as usize, l["output_rel_error"].as_f64()?)))
        .collect()
}

/// An SVG line plot (log-scale y) of per-layer values, one line per series.
pub fn plot_layers(path: &Path, title: &str, y_label: &str, series: &[Series]) -> Result<()> {
    let err = |e: String| anyhow!("{}: cannot draw the plot ({e})", path.display());
    let pts: Vec<(usize, f64)> = series.iter().flat_map(|s| s.values.iter().copied()).filter(|p| p.1 > 0.0).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let xmax = pts.iter().map(|p| p.0).max().unwrap_or(0) as f64 + 0.5;
    let ymin = pts.iter().map(|p| p.1).fold(f64::MAX, f64::min) / 1.5;
    let ymax = pts.iter().map(|p| p.1).fold(f64::MIN, f64::max) * 1.5;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..xmax, (ymin..ymax).log_scale())
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("decoder layer")
        .y_desc(y_label)
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .x_label_formatter(&|v| if (v - v.round()).abs() < 1e-9 { format!("{v:.0}") } else { String::new() })
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (k, s) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let line: Vec<(f64, f64)> = s.values.iter().filter(|p| p.1 > 0.0).map(|&(x, y)| (x as f64, y)).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// A Markdown table.
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// Per layer of a prune `report.json`: (layer, sparsity, output error, mean operator error, seconds).
pub fn layer_rows(report: &serde_json::Value) -> Vec<(usize, f64, Option<f64>, Option<f64>, f64)> {
    report["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let ops = l["operators"].as_array()?;
            let (mut zeros, mut total, mut errs) = (0f64, 0f64, Vec::new());
            for o in ops {
                let n = o["shape"][0].as_f64()? * o["shape"][1].as_f64()?;
                zeros += o["sparsity"].as_f64()? * n;
                total += n;
                errs.extend(o["rel_error"].as_f64());
            }
            let mean = (!errs.is_empty()).then(|| errs.iter().sum::<f64>() / errs.len() as f64);
            Some((
                l["layer"].as_u64()? as usize,
                zeros / total.max(1.0),
                l["output_rel_error"].as_f64(),
                mean,
                l["seconds"].as_f64()?,
            ))
        })
        .collect()
}

/// `report.md` and `layers.svg` beside a prune `report.json`: what was run, the outcome, and each layer.
pub fn write_prune_summary(dir: &Path, report: &serde_json::Value) -> Result<()> {
    let f = |v: &serde_json::Value, p: usize| v.as_f64().map_or("–".to_string(), |x| format!("{x:.p$}"));
    let rows = layer_rows(report);
    let mut md = format!(
        "# fistaprune: {} {} of {}\n\n| | |\n|---|---|\n| method | {} |\n| pattern | {} |\n| sparsity (measured) | {} |\n\
         | perplexity before → after | {} → {} |\n| prune time | {} s |\n| total time | {} s |\n| calibration | {} × {} from {} (sha256 {}) |\n| command | `{}` |\n\n",
        report["method"].as_str().unwrap_or("?"),
        report["pattern"].as_str().unwrap_or("?"),
        report["model"].as_str().unwrap_or("?"),
        report["method"].as_str().unwrap_or("?"),
        report["pattern"].as_str().unwrap_or("?"),
        f(&report["sparsity"], 4),
        f(&report["perplexity_before"], 3),
        f(&report["perplexity_after"], 3),
        f(&report["prune_seconds"], 1),
        f(&report["seconds"], 1),
        report["calibration"]["nsamples"],
        report["calibration"]["seqlen"],
        report["calibration"]["source"].as_str().unwrap_or("–"),
        report["calibration"]["sha256"].as_str().map(|s| &s[..s.len().min(12)]).unwrap_or("–"),
        report["command"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" "))
            .unwrap_or_default(),
    );
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(l, s, o, m, t)| {
            vec![
                l.to_string(),
                format!("{s:.4}"),
                o.map_or("–".into(), |x| format!("{x:.3e}")),
                m.map_or("–".into(), |x| format!("{x:.3e}")),
                format!("{t:.1}"),
            ]
        })
        .collect();
    md.push_str(&markdown_table(&["layer", "sparsity", "output error", "mean operator error", "seconds"], &table));
    md.push_str("\nOutput error: `‖f'(x) − f(x)‖² / ‖f(x) − x‖²` of the pruned layer on calibration inputs; operator error: `‖W'X* − WX‖² / ‖WX‖²`. Plot: `layers.svg`.\n");
    crate::output::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    let series = [
        Series { label: "layer output error".into(), values: rows.iter().filter_map(|r| Some((r.0, r.2?))).collect() },
        Series { label: "mean operator error".into(), values: rows.iter().filter_map(|r| Some((r.0, r.3?))).collect() },
        Series { label: "sparsity".into(), values: rows.iter().map(|r| (r.0, r.1)).collect() },
    ];
    let title = format!(
        "{} {}: per-layer error and sparsity",
        report["method"].as_str().unwrap_or("?"),
        report["pattern"].as_str().unwrap_or("?")
    );
    plot_layers(&dir.join("layers.svg"), &title, "relative error / sparsity", &series)
}
