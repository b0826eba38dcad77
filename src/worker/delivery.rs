//! A received message with its envelope parsed once: who it is (the id the
//! submit returned), which try this is, and how to send it on.

use crate::events::observe::Subject;
use crate::job::Envelope;
use crate::job::event::{ArrayRef, JobRef};
use crate::queue::Received;

pub struct Delivery {
    pub received: Received,
    /// The job, or why the body is not one (a fatal error).
    pub envelope: Result<Envelope, String>,
    /// The id the submit returned; stays the same across re-sends.
    pub message_id: String,
    /// Tries used so far, this one included, across hand-backs.
    pub attempt: u32,
    /// Which of the worker's queues it came from.
    pub source: usize,
}

impl Delivery {
    pub fn new(received: Received) -> Self {
        let envelope = Envelope::parse(&received.body, &received.message_id);
        let (message_id, failures) = match &envelope {
            Ok(e) => (e.message_id(&received.message_id).to_owned(), e.failures),
            Err(_) => (received.message_id.clone(), 0),
        };
        Self {
            attempt: received.receive_count.saturating_add(failures),
            source: 0,
            message_id,
            envelope,
            received,
        }
    }

    /// The same, from the worker's queue number `source`.
    pub fn from_source(self, source: usize) -> Self {
        Self { source, ..self }
    }

    /// The job as its events name it.
    pub fn subject(&self, queue: &str) -> Subject {
        let envelope = self.envelope.as_ref().ok();
        Subject {
            job: JobRef {
                job_id: envelope.map_or_else(|| self.message_id.clone(), |e| e.job_id.clone()),
                message_id: self.message_id.clone(),
                queue: queue.to_owned(),
                command: envelope.map(|e| e.command.clone()).unwrap_or_default(),
                attempt: self.attempt,
                array: envelope.and_then(|e| e.array.as_ref()).map(ArrayRef::of),
                label: envelope.map(|e| e.label.clone()).unwrap_or_default(),
            },
            notifications: envelope
                .map(|e| e.notifications.clone())
                .unwrap_or_default(),
        }
    }

    /// The ids a cancel may name the job by: its message id (what the
    /// submit of a plain job returned), its job id and its array's.
    pub fn cancel_ids(&self) -> Vec<&str> {
        let mut ids = vec![self.message_id.as_str()];
        if let Ok(envelope) = &self.envelope {
            ids.push(&envelope.job_id);
            ids.extend(envelope.array.as_ref().map(|a| a.job_id.as_str()));
        }
        ids
    }

    /// The body to send the job on with: its envelope, changed by `edit`
    /// and naming the submit's message id; an unreadable body as it was.
    pub fn resend_body(&self, edit: impl FnOnce(&mut Envelope)) -> String {
        match &self.envelope {
            Ok(envelope) => envelope.resent(&self.message_id, edit),
            Err(_) => self.received.body.clone(),
        }
    }
}
