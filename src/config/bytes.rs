//! Sizes in `workers.toml`: a plain number of bytes (`262144`) or a string
//! with a unit (`"256KiB"`, `"100GiB"`, `"5 MB"`), as durations are written
//! `"5m"`. `KiB`/`MiB`/`GiB` are powers of 1024, `KB`/`MB`/`GB` of 1000
//! (the `bytesize` crate's reading). Used as `#[serde(with = "bytes")]`.

use serde::{Deserialize, Deserializer};

/// Reads a size as `T` (`u64` or `usize`); one that does not fit is an
/// error naming the limit, and one that does not parse names what does.
pub fn deserialize<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Number(u64),
        Text(String),
    }
    let bytes = match Written::deserialize(deserializer)? {
        Written::Number(n) => n,
        Written::Text(text) => text
            .trim()
            .parse::<bytesize::ByteSize>()
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "`{text}` is not a size ({e}); write bytes, or e.g. \"512MiB\", \"100GiB\""
                ))
            })?
            .as_u64(),
    };
    T::try_from(bytes).map_err(|_| {
        serde::de::Error::custom(format!("{bytes} bytes is more than this setting can hold"))
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Sizes {
        #[serde(with = "super")]
        size: u64,
    }

    fn read(value: &str) -> Result<u64, String> {
        toml::from_str::<Sizes>(&format!("size = {value}"))
            .map(|s| s.size)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn numbers_and_sizes_with_units_are_read() {
        assert_eq!(read("262144"), Ok(262_144));
        assert_eq!(read("\"256KiB\""), Ok(262_144));
        assert_eq!(read("\"100GiB\""), Ok(100 << 30));
        assert_eq!(read("\"5 MB\""), Ok(5_000_000));
        assert_eq!(read("\"1024\""), Ok(1024));
        let err = read("\"lots\"").unwrap_err();
        assert!(err.contains("`lots` is not a size"), "{err}");
        assert!(read("-1").is_err());
    }
}
