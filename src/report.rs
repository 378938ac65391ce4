//! Reports: the typed `report.json` of a pruned checkpoint, which every reader uses, and what is drawn from it
//! (`report.md`, the per-layer plots, Markdown tables).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::calibration::CalibrationInfo;
use crate::model::export::OutDType;
use crate::prune::PruneOptions;
use crate::prune::layer::{LayerReport, OperatorReport};

/// `report.json` of a pruned checkpoint (or of a part written with `--layers`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneReport {
    /// Marks the folder as fistaprune's ([`crate::output::VERSION_KEY`]).
    pub fistaprune_version: String,
    pub command: Vec<String>,
    pub model: String,
    pub architecture: String,
    pub method: String,
    /// The pattern as people write it (`50%`, `2:4`).
    pub pattern: String,
    pub target_sparsity: f64,
    pub dtype: OutDType,
    /// The decoder layers pruned (inclusive).
    pub layer_range: (usize, usize),
    pub options: PruneOptions,
    /// Intra-layer error correction, as resolved from the options and the method.
    pub error_correction: bool,
    /// Layers an interrupted run had pruned, reloaded by `--resume`.
    pub resumed_layers: usize,
    pub allocation: Option<Allocation>,
    pub calibration: Option<CalibrationInfo>,
    pub jobs: usize,
    pub layers: Vec<LayerReport>,
    /// Measured over the pruned operators (see [`PruneReport::totals`]).
    pub sparsity: f64,
    pub pruned_parameters: u64,
    pub prune_seconds: f64,
    pub prune_gflop: f64,
    pub prune_gflop_per_second: Option<f64>,
    pub eval: Option<EvalInfo>,
    pub perplexity_before: Option<f64>,
    pub perplexity_after: Option<f64>,
    /// The whole run, evaluation included.
    pub seconds: f64,
    /// `merge`: the parts joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_from: Option<Vec<String>>,
}

/// A non-uniform allocation of the sparsity over the layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Allocation {
    pub method: String,
    pub lambda: f64,
    pub m: f64,
    pub layer_sparsity: Vec<f64>,
    pub outlier_ratios: Vec<f64>,
}

/// What `--eval` measured perplexity on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalInfo {
    pub dataset: String,
    pub seqlen: usize,
    pub windows: usize,
}

impl PruneReport {
    /// Read `dir/report.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("report.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read (not an output of fistaprune prune?)", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a prune report of this fistaprune version", path.display()))
    }

    /// The totals of `layers`: measured sparsity, pruned parameters, counted GFLOP and their rate.
    pub fn totals(&mut self) {
        let size = |o: &OperatorReport| (o.shape[0] * o.shape[1]) as f64;
        let ops = self.layers.iter().flat_map(|l| &l.operators);
        let (zeros, total) = ops.fold((0f64, 0f64), |(z, t), o| (z + o.sparsity * size(o), t + size(o)));
        self.sparsity = if total > 0.0 { zeros / total } else { 0.0 };
        self.pruned_parameters = total as u64;
        self.prune_gflop = self.layers.iter().map(|l| l.gflop).sum();
        self.prune_gflop_per_second = (self.prune_seconds > 0.0).then(|| self.prune_gflop / self.prune_seconds);
    }

    /// Each layer's output error (`output_rel_error`).
    pub fn layer_errors(&self) -> Vec<(usize, f64)> {
        self.layers.iter().filter_map(|l| Some((l.layer, l.output_rel_error?))).collect()
    }
}

/// One line of a per-layer plot: a label and a value per layer.
pub struct Series {
    pub label: String,
    pub values: Vec<(usize, f64)>,
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

/// `report.md` and `layers.svg` beside a prune `report.json`: what was run, the outcome, and each layer.
pub fn write_prune_summary(dir: &Path, r: &PruneReport) -> Result<()> {
    let f = |v: Option<f64>, p: usize| v.map_or("–".to_string(), |x| format!("{x:.p$}"));
    let c = r.calibration.as_ref();
    let mut md = format!(
        "# fistaprune: {} {} of {}\n\n| | |\n|---|---|\n| method | {} |\n| pattern | {} |\n| sparsity (measured) | {:.4} |\n\
         | perplexity before → after | {} → {} |\n| prune time | {:.1} s |\n| total time | {:.1} s |\n| calibration | {} × {} from {} (sha256 {}) |\n| command | `{}` |\n\n",
        r.method,
        r.pattern,
        r.model,
        r.method,
        r.pattern,
        r.sparsity,
        f(r.perplexity_before, 3),
        f(r.perplexity_after, 3),
        r.prune_seconds,
        r.seconds,
        c.map_or("–".into(), |c| c.nsamples.to_string()),
        c.map_or("–".into(), |c| c.seqlen.to_string()),
        c.map_or("–", |c| c.source.as_str()),
        c.map_or("–", |c| &c.sha256[..c.sha256.len().min(12)]),
        r.command.join(" "),
    );
    let mean_error = |l: &LayerReport| {
        let errs: Vec<f64> = l.operators.iter().filter_map(|o| o.rel_error).collect();
        (!errs.is_empty()).then(|| errs.iter().sum::<f64>() / errs.len() as f64)
    };
    let table: Vec<Vec<String>> = r
        .layers
        .iter()
        .map(|l| {
            vec![
                l.layer.to_string(),
                format!("{:.4}", l.sparsity()),
                l.output_rel_error.map_or("–".into(), |x| format!("{x:.3e}")),
                mean_error(l).map_or("–".into(), |x| format!("{x:.3e}")),
                format!("{:.1}", l.seconds),
            ]
        })
        .collect();
    md.push_str(&markdown_table(&["layer", "sparsity", "output error", "mean operator error", "seconds"], &table));
    md.push_str("\nOutput error: `‖f'(x) − f(x)‖² / ‖f(x) − x‖²` of the pruned layer on calibration inputs; operator error: `‖W'X* − WX‖² / ‖WX‖²`. Plot: `layers.svg`.\n");
    crate::output::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    let series = [
        Series { label: "layer output error".into(), values: r.layer_errors() },
        Series {
            label: "mean operator error".into(),
            values: r.layers.iter().filter_map(|l| Some((l.layer, mean_error(l)?))).collect(),
        },
        Series { label: "sparsity".into(), values: r.layers.iter().map(|l| (l.layer, l.sparsity())).collect() },
    ];
    let title = format!("{} {}: per-layer error and sparsity", r.method, r.pattern);
    plot_layers(&dir.join("layers.svg"), &title, "relative error / sparsity", &series)
}
