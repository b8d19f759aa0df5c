//! The figures `cluster-bench` measures, and `BENCHMARKS.md` written from them: each figure
//! with its baseline from the same run, as median and p99 with the number of runs, the seed's
//! target beside it, and the command that measures it.

use std::fmt::Write as _;

/// How long a run may take: `--quick` (under 2 minutes on 2 cores) takes fewer samples and
/// smaller sizes than a full run (under 10 minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Quick,
    Full,
}

impl Scale {
    /// `quick` in a quick run, `full` in a full one.
    pub fn pick<T>(self, quick: T, full: T) -> T {
        match self {
            Scale::Quick => quick,
            Scale::Full => full,
        }
    }
}

/// Samples of one quantity.
#[derive(Debug, Clone)]
pub struct Samples {
    values: Vec<f64>,
    unit: &'static str,
    /// Digits after the decimal point.
    precision: usize,
}

impl Samples {
    pub fn new(values: Vec<f64>, unit: &'static str, precision: usize) -> Self {
        assert!(!values.is_empty(), "a figure needs at least one sample");
        Samples {
            values,
            unit,
            precision,
        }
    }

    /// Milliseconds, from seconds.
    pub fn millis_from_seconds(seconds: &[f64]) -> Self {
        Samples::new(seconds.iter().map(|s| s * 1000.0).collect(), "ms", 0)
    }

    pub fn one(value: f64, unit: &'static str, precision: usize) -> Self {
        Samples::new(vec![value], unit, precision)
    }

    pub fn median(&self) -> f64 {
        percentile(&self.values, 0.5)
    }

    pub fn p99(&self) -> f64 {
        percentile(&self.values, 0.99)
    }

    pub fn runs(&self) -> usize {
        self.values.len()
    }

    fn number(&self, value: f64) -> String {
        with_thousands(&format!("{value:.*}", self.precision))
    }

    fn render(&self) -> String {
        let unit = if self.unit.is_empty() {
            String::new()
        } else {
            format!(" {}", self.unit)
        };
        if self.runs() == 1 {
            format!("{}{unit}", self.number(self.values[0]))
        } else {
            format!(
                "{}{unit} (p99 {}, n={})",
                self.number(self.median()),
                self.number(self.p99()),
                self.runs()
            )
        }
    }
}

/// The value at fraction `p` of the sorted values, nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn with_thousands(number: &str) -> String {
    let (whole, rest) = number.split_at(number.find('.').unwrap_or(number.len()));
    let (sign, digits) = whole.split_at(usize::from(whole.starts_with('-')));
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    format!("{sign}{grouped}{rest}")
}

/// One figure: a value, usually against a baseline measured in the same run.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: String,
    /// What the baseline is, and its samples.
    pub baseline: Option<(String, Samples)>,
    pub value: Samples,
    /// Whether the ratio of the medians (value / baseline) means something.
    pub ratio: bool,
    /// More of what was measured, in words.
    pub detail: String,
    /// What the seed asks of it.
    pub target: &'static str,
}

impl Figure {
    pub fn new(name: impl Into<String>, value: Samples) -> Self {
        Figure {
            name: name.into(),
            baseline: None,
            value,
            ratio: false,
            detail: String::new(),
            target: "",
        }
    }

    pub fn against(mut self, baseline: impl Into<String>, samples: Samples) -> Self {
        self.baseline = Some((baseline.into(), samples));
        self.ratio = true;
        self
    }

    /// A baseline whose ratio to the value means nothing (a different unit, say).
    pub fn beside(mut self, baseline: impl Into<String>, samples: Samples) -> Self {
        self.baseline = Some((baseline.into(), samples));
        self.ratio = false;
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    pub fn target(mut self, target: &'static str) -> Self {
        self.target = target;
        self
    }

    /// Value over baseline, medians.
    pub fn ratio_of_medians(&self) -> Option<f64> {
        let (_, baseline) = self.baseline.as_ref()?;
        (self.ratio && baseline.median() != 0.0).then(|| self.value.median() / baseline.median())
    }

    fn row(&self) -> String {
        let baseline = self
            .baseline
            .as_ref()
            .map(|(what, samples)| format!("{what}: {}", samples.render()))
            .unwrap_or_default();
        let mut value = self.value.render();
        if !self.detail.is_empty() {
            value.push_str("; ");
            value.push_str(&self.detail);
        }
        let ratio = self
            .ratio_of_medians()
            .map(|ratio| format!("{ratio:.3}"))
            .unwrap_or_default();
        format!(
            "| {} | {baseline} | {value} | {ratio} | {} |",
            self.name, self.target
        )
    }
}

/// A section of the report: one `scripts/bench.sh SECTION`.
#[derive(Debug)]
pub struct Section {
    pub key: &'static str,
    pub title: &'static str,
    /// How the figures are measured, in Markdown.
    pub method: &'static str,
    pub figures: Vec<Figure>,
    pub seconds: f64,
}

/// Every section measured in one run.
#[derive(Debug, Default)]
pub struct Report {
    pub sections: Vec<Section>,
}

impl Report {
    /// The section's table, printed as soon as it is measured.
    pub fn table(section: &Section) -> String {
        let mut text = String::new();
        let _ = writeln!(text, "## {}\n", section.title);
        let _ = writeln!(
            text,
            "`scripts/bench.sh {}` ({:.0} s)\n",
            section.key, section.seconds
        );
        let _ = writeln!(text, "| figure | baseline | value | ratio | target |");
        let _ = writeln!(text, "|---|---|---|---|---|");
        for figure in &section.figures {
            let _ = writeln!(text, "{}", figure.row());
        }
        let _ = writeln!(text, "\n{}", section.method.trim());
        text
    }

    /// The whole of `BENCHMARKS.md`.
    pub fn markdown(&self, scale: Scale, machine: &str, took: f64) -> String {
        let mut text = String::from("# Benchmarks\n\n");
        let command = match scale {
            Scale::Quick => "scripts/bench.sh --quick",
            Scale::Full => "scripts/bench.sh",
        };
        let _ = writeln!(
            text,
            "Written by `{command}` ({took:.0} s in all), which measured every figure below with \
             its baseline in the same run; nothing here is typed in. Values are the median, with \
             the p99 and the number of runs (n) where a figure was sampled more than once; the \
             ratio is of the medians, value over baseline. `scripts/bench.sh SECTION` measures \
             one section; `--quick` takes fewer samples and smaller sizes. The in-process hot \
             paths also have criterion benchmarks: `cargo bench`. Targets are the seed's success \
             metrics (marked *seed*) and the performance goals the project set itself.\n"
        );
        let _ = writeln!(text, "{machine}\n");
        for section in &self.sections {
            text.push_str(&Self::table(section));
            text.push('\n');
        }
        text
    }
}
