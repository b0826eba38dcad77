//! `[fleet]`: what the machines cost.
//!
//! ```toml
//! [fleet.price]
//! per_hour = 1.20                              # any instance not listed
//! "g5.xlarge" = { spot = 0.45, on_demand = 1.006 }
//! "c7i.2xlarge" = 0.357                        # either lifecycle
//! ```
//!
//! Prices are US dollars per instance-hour, numbers or strings (`"$1.006"`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Invalid;
use crate::job::usage::{Instance, Lifecycle};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Prices per instance type (and lifecycle), and `per_hour` for any
    /// other: a run's cost is its wall time × the price ÷ the worker's
    /// slots. Without it, events carry no cost.
    #[serde(default)]
    pub price: BTreeMap<String, PriceEntry>,
}

/// One instance type's price: one for both lifecycles, or one for each.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PriceEntry {
    Flat(Amount),
    ByLifecycle(BTreeMap<String, Amount>),
}

/// A price as written: a number, or text such as `"$3.06"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Amount {
    Number(f64),
    Text(String),
}

impl Amount {
    fn dollars(&self, key: &str) -> Result<f64, Invalid> {
        let value = match self {
            Amount::Number(n) => *n,
            Amount::Text(text) => {
                text.trim()
                    .trim_start_matches('$')
                    .trim()
                    .parse()
                    .map_err(|_| {
                        Invalid::new(key, format!("`{text}` is not a price in dollars per hour"))
                    })?
            }
        };
        if !value.is_finite() || value < 0.0 {
            return Err(Invalid::new(
                key,
                format!("{value} is not a price: must be 0 or more dollars per hour"),
            ));
        }
        Ok(value)
    }
}

/// The key an error names for an instance type.
fn type_key(instance_type: &str) -> String {
    format!("fleet.price.\"{instance_type}\"")
}

/// `[fleet] price`, checked: dollars per instance-hour.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prices {
    per_hour: Option<f64>,
    /// By instance type; a `None` lifecycle is the price of both.
    types: BTreeMap<String, BTreeMap<Option<Lifecycle>, f64>>,
}

impl Prices {
    /// Whether any price was given.
    pub fn is_empty(&self) -> bool {
        self.per_hour.is_none() && self.types.is_empty()
    }

    /// The price of an hour of `instance`: its type and lifecycle's, its
    /// type's, or `per_hour`.
    pub fn per_hour(&self, instance: &Instance) -> Option<f64> {
        let by_type = instance
            .instance_type
            .as_ref()
            .and_then(|t| self.types.get(t));
        by_type
            .and_then(|prices| {
                (instance.lifecycle)
                    .and_then(|l| prices.get(&Some(l)))
                    .or_else(|| prices.get(&None))
            })
            .copied()
            .or(self.per_hour)
    }
}

impl FleetConfig {
    /// The price table, each price checked; an error names its key.
    pub fn prices(&self) -> Result<Prices, Invalid> {
        let mut prices = Prices::default();
        for (name, entry) in &self.price {
            match (name.as_str(), entry) {
                ("per_hour", PriceEntry::Flat(amount)) => {
                    prices.per_hour = Some(amount.dollars("fleet.price.per_hour")?);
                }
                ("per_hour", PriceEntry::ByLifecycle(_)) => {
                    return Err(Invalid::new(
                        "fleet.price.per_hour",
                        "must be one price in dollars per hour",
                    ));
                }
                (_, PriceEntry::Flat(amount)) => {
                    let price = amount.dollars(&type_key(name))?;
                    prices
                        .types
                        .entry(name.clone())
                        .or_default()
                        .insert(None, price);
                }
                (_, PriceEntry::ByLifecycle(by)) => {
                    for (lifecycle, amount) in by {
                        let key = format!("{}.{lifecycle}", type_key(name));
                        let lifecycle: Lifecycle =
                            lifecycle.parse().map_err(|e| Invalid::new(&key, e))?;
                        let price = amount.dollars(&key)?;
                        prices
                            .types
                            .entry(name.clone())
                            .or_default()
                            .insert(Some(lifecycle), price);
                    }
                }
            }
        }
        Ok(prices)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::super::tests::MINIMAL;
    use super::*;

    fn prices(table: &str) -> Result<Prices, String> {
        let text = format!("{MINIMAL}\n[fleet.price]\n{table}\n");
        Config::from_toml(&text, std::path::Path::new("/srv"))
            .map(|c| c.fleet.prices().unwrap())
            .map_err(|e| e.to_string())
    }

    fn instance(instance_type: &str, lifecycle: Option<Lifecycle>) -> Instance {
        Instance {
            instance_type: Some(instance_type.into()),
            lifecycle,
        }
    }

    #[test]
    fn a_price_is_the_types_and_lifecycles_then_the_types_then_per_hour() {
        let prices = prices(
            "per_hour = 1.5\n\"g5.xlarge\" = { spot = 0.45, on_demand = \"$3.06\" }\n\"c7i.large\" = 0.1",
        )
        .unwrap();
        let on_demand = Some(Lifecycle::OnDemand);
        assert_eq!(
            prices.per_hour(&instance("g5.xlarge", on_demand)),
            Some(3.06)
        );
        assert_eq!(
            prices.per_hour(&instance("g5.xlarge", Some(Lifecycle::Spot))),
            Some(0.45)
        );
        // A lifecycle not priced for the type: per_hour.
        assert_eq!(prices.per_hour(&instance("g5.xlarge", None)), Some(1.5));
        assert_eq!(
            prices.per_hour(&instance("c7i.large", on_demand)),
            Some(0.1)
        );
        assert_eq!(prices.per_hour(&instance("m5.large", None)), Some(1.5));
        assert_eq!(prices.per_hour(&Instance::default()), Some(1.5));
        assert!(
            super::super::Config::from_toml(MINIMAL, std::path::Path::new("/srv"))
                .unwrap()
                .fleet
                .prices()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bad_prices_are_refused_naming_the_key() {
        for (table, key) in [
            ("per_hour = -1", "fleet.price.per_hour"),
            ("per_hour = \"cheap\"", "fleet.price.per_hour"),
            (
                "\"g5.xlarge\" = { spot = -0.5 }",
                "fleet.price.\"g5.xlarge\".spot",
            ),
            (
                "\"g5.xlarge\" = { reserved = 1 }",
                "fleet.price.\"g5.xlarge\".reserved",
            ),
            ("\"g5.xlarge\" = \"1,50\"", "fleet.price.\"g5.xlarge\""),
        ] {
            let error = prices(table).unwrap_err();
            assert!(error.contains(key), "{table}: {error}");
        }
        assert!(
            prices("\"g5.xlarge\" = { reserved = 1 }")
                .unwrap_err()
                .contains("unknown lifecycle")
        );
    }
}
