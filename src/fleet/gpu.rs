//! GPUs on this machine (`nvidia-smi`), and which slot runs on which.
//!
//! With `[worker] gpus = "auto"` every GPU found gets a slot (unless
//! `slots` says otherwise), and each slot's commands see only their GPU
//! through `CUDA_VISIBLE_DEVICES` and `NVIDIA_VISIBLE_DEVICES`. No GPU, or
//! no `nvidia-smi`, is one info line and slots as configured.

use crate::config::GpusConfig;

/// One GPU, as `nvidia-smi` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_mib: u64,
}

/// Parses `nvidia-smi --query-gpu=index,uuid,name,memory.total
/// --format=csv,noheader,nounits`.
fn parse(csv: &str) -> Result<Vec<Gpu>, String> {
    csv.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, uuid, name, memory] = fields[..] else {
                return Err(format!("unexpected nvidia-smi line `{line}`"));
            };
            Ok(Gpu {
                index: index
                    .parse()
                    .map_err(|_| format!("bad GPU index in `{line}`"))?,
                uuid: uuid.to_owned(),
                name: name.to_owned(),
                memory_mib: memory.trim_end_matches(" MiB").parse().unwrap_or(0),
            })
        })
        .collect()
}

/// The GPUs `nvidia-smi` on `PATH` reports; `Err` when there is no
/// `nvidia-smi` or it fails.
pub fn discover() -> Result<Vec<Gpu>, String> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,uuid,name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .map_err(|e| format!("cannot run nvidia-smi: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nvidia-smi failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// One GPU's load at a moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub index: u32,
    /// 0 to 1.
    pub utilization: f64,
    pub memory_used_bytes: u64,
}

/// Reads every GPU's utilization and memory in use.
pub async fn utilization() -> Result<Vec<Sample>, String> {
    query(&[]).await
}

/// Reads the utilization and memory in use of the GPUs `ids` (every GPU
/// when empty: `nvidia-smi -i`). Dropping the future kills the query, so
/// a caller bounds a hanging `nvidia-smi` with a timeout.
pub async fn query(ids: &[u32]) -> Result<Vec<Sample>, String> {
    let mut command = tokio::process::Command::new("nvidia-smi");
    command
        .args([
            "--query-gpu=index,utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
        ])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if !ids.is_empty() {
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        command.args(["-i", &list.join(",")]);
    }
    let out = command
        .output()
        .await
        .map_err(|e| format!("cannot run nvidia-smi: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nvidia-smi failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let samples = parse_samples(&String::from_utf8_lossy(&out.stdout))?;
    Ok(samples
        .into_iter()
        .filter(|s| ids.is_empty() || ids.contains(&s.index))
        .collect())
}

/// Parses `nvidia-smi --query-gpu=index,utilization.gpu,memory.used
/// --format=csv,noheader,nounits`.
fn parse_samples(csv: &str) -> Result<Vec<Sample>, String> {
    csv.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, percent, mib] = fields[..] else {
                return Err(format!("unexpected nvidia-smi line `{line}`"));
            };
            Ok(Sample {
                index: index
                    .parse()
                    .map_err(|_| format!("bad index in `{line}`"))?,
                utilization: percent.parse::<f64>().unwrap_or(0.0) / 100.0,
                memory_used_bytes: mib.parse::<u64>().unwrap_or(0) * 1024 * 1024,
            })
        })
        .collect()
}

/// The GPU index each slot is pinned to (empty: no pinning), from the
/// setting and what `discover` finds installed (called only when the
/// setting needs it: not for "off"). Errors name what is wrong with the
/// setting.
pub fn assign(
    config: &GpusConfig,
    discover: impl FnOnce() -> Result<Vec<Gpu>, String>,
) -> Result<Vec<u32>, String> {
    match config {
        GpusConfig::Mode(mode) if mode == "off" => Ok(Vec::new()),
        GpusConfig::Mode(mode) if mode == "auto" => match discover() {
            Ok(gpus) if !gpus.is_empty() => {
                for gpu in &gpus {
                    tracing::info!(index = gpu.index, name = %gpu.name, memory_mib = gpu.memory_mib, uuid = %gpu.uuid, "Found GPU.");
                }
                Ok(gpus.iter().map(|g| g.index).collect())
            }
            found => {
                let why = found.err().unwrap_or_else(|| "none found".into());
                tracing::info!(reason = %why, "No GPU: slots are not pinned.");
                Ok(Vec::new())
            }
        },
        GpusConfig::Mode(other) => Err(format!(
            "`{other}` is not \"auto\", \"off\" or a list of GPU indexes"
        )),
        GpusConfig::List(wanted) => {
            let found = discover()?;
            match wanted
                .iter()
                .find(|i| !found.iter().any(|g| g.index == **i))
            {
                Some(missing) => Err(format!(
                    "GPU {missing} is not on this machine (nvidia-smi lists {:?})",
                    found.iter().map(|g| g.index).collect::<Vec<_>>()
                )),
                None => Ok(wanted.clone()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "0, GPU-aaaa, NVIDIA L4, 23034\n1, GPU-bbbb, NVIDIA L4, 23034\n";

    #[test]
    fn nvidia_smi_csv_parses() {
        let gpus = parse(TWO).unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            (gpus[1].index, gpus[1].uuid.as_str(), gpus[1].memory_mib),
            (1, "GPU-bbbb", 23034)
        );
        assert!(parse("garbage").is_err());
        let samples = parse_samples("0, 37, 7168\n1, 0, 0\n").unwrap();
        assert_eq!(samples[0].memory_used_bytes, 7 << 30);
        assert!((samples[0].utilization - 0.37).abs() < 1e-9);
        assert!(parse_samples("0, 37").is_err());
    }

    #[test]
    fn settings_pick_the_slots_gpus() {
        let found = || parse(TWO);
        assert_eq!(
            assign(&GpusConfig::Mode("auto".into()), found),
            Ok(vec![0, 1])
        );
        assert_eq!(assign(&GpusConfig::Mode("off".into()), found), Ok(vec![]));
        assert_eq!(
            assign(&GpusConfig::Mode("auto".into()), || Err(
                "no nvidia-smi".into()
            )),
            Ok(vec![])
        );
        assert_eq!(assign(&GpusConfig::List(vec![1]), found), Ok(vec![1]));
        assert!(
            assign(&GpusConfig::List(vec![3]), found)
                .unwrap_err()
                .contains("GPU 3")
        );
        assert!(assign(&GpusConfig::List(vec![0]), || Err("no nvidia-smi".into())).is_err());
        assert!(assign(&GpusConfig::Mode("all".into()), found).is_err());
    }
}
