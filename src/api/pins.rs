//! Pinning a job's inputs at submit: what each input object (or manifest)
//! is now, recorded in the job, so that every try and every child of an
//! array gets those bytes and no others (SPEC §6b).

use super::submit::SubmitError;
use crate::commands::catalog::Catalog;
use crate::job::inputs::{InputKind, InputSpec};
use crate::job::params::FieldError;
use crate::storage::Buckets;

/// Records in each input what its object is now: one `HEAD` each, all at
/// once, before the job is built. The inputs are checked first, so nothing
/// is asked of a bucket the queue may not read; a missing object is
/// refused like any bad field, a bucket that cannot be reached is
/// [`SubmitError::Input`].
pub(super) async fn pin(
    catalog: &Catalog,
    buckets: &Buckets,
    queue: &str,
    inputs: &mut [InputSpec],
) -> Result<(), SubmitError> {
    catalog.check_inputs(queue, inputs)?;
    let heads = inputs.iter().enumerate().map(|(i, input)| async move {
        let (field, key) = match input.kind() {
            Some(InputKind::Object { key }) => (format!("inputs[{i}].key"), key),
            Some(InputKind::Manifest { key }) => (format!("inputs[{i}].manifest"), key),
            None => unreachable!("checked: one of key and manifest"),
        };
        let Some(bucket) = buckets.get(&input.bucket) else {
            return Err(FieldError::new(
                format!("inputs[{i}].bucket"),
                format!("no bucket `{}` is configured", input.bucket),
            )
            .into());
        };
        match bucket.head(key).await {
            Ok(info) => Ok(info.pin()),
            Err(e) if e.permanent => Err(FieldError::new(field, e.to_string()).into()),
            Err(source) => Err(SubmitError::Input { field, source }),
        }
    });
    let pins = futures_util::future::try_join_all(heads).await?;
    for (input, pin) in inputs.iter_mut().zip(pins) {
        input.pin = Some(pin);
    }
    Ok(())
}
