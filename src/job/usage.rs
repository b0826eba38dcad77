//! What one try of a job used, and on what: the `usage` of its end event
//! (SPEC §13). Pure values; the worker measures them (`commands::usage`,
//! `worker::usage`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How the instance is bought.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lifecycle {
    Spot,
    OnDemand,
}

impl Lifecycle {
    pub const ALL: [Lifecycle; 2] = [Lifecycle::Spot, Lifecycle::OnDemand];

    /// As IMDS's `instance-life-cycle` and the events spell it.
    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Spot => "spot",
            Lifecycle::OnDemand => "on-demand",
        }
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Lifecycle {
    type Err = String;

    /// `spot`, `on-demand` (IMDS's spelling) or `on_demand` (a TOML key's).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spot" => Ok(Lifecycle::Spot),
            "on-demand" | "on_demand" => Ok(Lifecycle::OnDemand),
            other => Err(format!(
                "unknown lifecycle `{other}`: not \"spot\" or \"on_demand\""
            )),
        }
    }
}

/// The instance a worker runs on, as IMDS tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Instance {
    pub instance_type: Option<String>,
    pub lifecycle: Option<Lifecycle>,
}

/// What the program (and everything it waited for) used: the whole
/// process group's CPU and its peak resident memory.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    /// User plus system time.
    pub cpu_s: f64,
    pub peak_rss_bytes: u64,
}

/// The slot's GPUs over the run, from samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuUsage {
    /// The most memory in use on any of the slot's GPUs at a sample.
    pub peak_memory_bytes: u64,
    /// Mean utilisation over the samples, 0 to 1.
    pub mean_utilization: f64,
    pub samples: u32,
}

/// One try's `usage`, as its end event carries it. A figure that was not
/// measured (a built-in's CPU, a slot without a GPU, a machine off EC2,
/// no price) is left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub wall_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_peak_bytes: Option<u64>,
    /// 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_utilization_mean: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// Wall time × the instance's price ÷ the slots sharing it, with
    /// `[fleet] price`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

impl Usage {
    /// A try's usage from what was measured.
    pub fn new(
        wall_s: f64,
        process: Option<ProcessUsage>,
        gpu: Option<GpuUsage>,
        instance: &Instance,
    ) -> Self {
        Self {
            wall_s,
            cpu_s: process.map(|p| p.cpu_s),
            peak_rss_bytes: process.map(|p| p.peak_rss_bytes),
            gpu_memory_peak_bytes: gpu.map(|g| g.peak_memory_bytes),
            gpu_utilization_mean: gpu.map(|g| g.mean_utilization),
            instance_type: instance.instance_type.clone(),
            lifecycle: instance.lifecycle,
            cost_usd: None,
        }
    }

    /// The cost of `wall_s` at `per_hour` for the instance, shared by
    /// `slots`.
    pub fn priced(mut self, per_hour: Option<f64>, slots: usize) -> Self {
        self.cost_usd = per_hour.map(|p| self.wall_s * p / 3600.0 / slots.max(1) as f64);
        self
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("usage always serializes")
    }
}

/// `"budget": {"usd": 25}` on a submit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub usd: f64,
}

impl Budget {
    /// Why it cannot be a budget, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.usd.is_finite() && self.usd >= 0.0 {
            Ok(())
        } else {
            Err(format!(
                "{} is not a budget: must be 0 or more dollars",
                self.usd
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ten_second_run_on_a_two_slot_instance_costs_half_its_share() {
        let instance = Instance {
            instance_type: Some("g5.xlarge".into()),
            lifecycle: Some(Lifecycle::OnDemand),
        };
        let usage = Usage::new(10.0, None, None, &instance).priced(Some(3.06), 2);
        assert!((usage.cost_usd.unwrap() - 0.00425).abs() < 1e-9);
        let json = usage.to_json();
        assert_eq!(json["lifecycle"], "on-demand");
        assert_eq!(json["instance_type"], "g5.xlarge");
        assert!(
            json.get("cpu_s").is_none(),
            "unmeasured is left out: {json}"
        );
        assert_eq!(Usage::new(1.0, None, None, &instance).cost_usd, None);
    }

    #[test]
    fn lifecycles_parse_in_both_spellings() {
        assert_eq!("spot".parse(), Ok(Lifecycle::Spot));
        assert_eq!("on-demand".parse(), Ok(Lifecycle::OnDemand));
        assert_eq!("on_demand".parse(), Ok(Lifecycle::OnDemand));
        assert!(
            "reserved"
                .parse::<Lifecycle>()
                .unwrap_err()
                .contains("reserved")
        );
    }
}
