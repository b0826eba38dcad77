//! renderq: a queue manager for render farms.
//!
//! Clients submit render jobs over JSON-RPC; jobs travel through a message
//! queue; workers pull one job per slot, run the command, run the post-tasks,
//! and delete the message only when all of that succeeded.
//!
//! # Code map
//!
//! The folders, from the bottom up: each imports only from the ones above
//! it in this list (and the plumbing at the top of `src/`).
//!
//! - Plumbing, at the top of `src/`: [`access`] (who runs what and who
//!   owns which file: the job user of `[worker] run_as`, the modes of the
//!   worker's state), [`aws`] (shared SDK set-up),
//!   [`retry`] (the one back-off policy: job retries, queue outages,
//!   postbacks, array sends), [`sqlite`] (how the queue, ledger and status
//!   files are opened; SQLite work on an async thread that gives up on a
//!   lock instead of waiting, `without_waiting`), [`workspace`] (each
//!   process's own folder under `work_dir`: job folders, process-group
//!   records, its reaper, and the sweep after dead workers).
//! - [`job`]: what a job is, as plain values: the queue message envelope
//!   and key templates, command parameter schemas ([`job::params`]), frame
//!   specs ([`job::frames`]), dependencies between jobs and how a `same`
//!   edge maps frames through both arrays' chunks ([`job::depends`]),
//!   job and message ids in their one spelling
//!   ([`job::id`]), inputs and the Deadline Cloud manifests they may name
//!   ([`job::manifest`]), a job's name, owner and metadata
//!   ([`job::label`]), lifecycle events ([`job::event`]), a command's
//!   result ([`job::output`]) and what a try used and cost
//!   ([`job::usage`]). Pure.
//! - [`config`]: `workers.toml` types, defaults and checks (file, line, key
//!   in every error), `[fleet] price` checked into [`config::Prices`].
//! - [`queue`]: the queue interface with SQS semantics, an enum over the
//!   backends: `local` (embedded, SQLite in WAL mode, shared by processes on
//!   one machine; concurrent sends committed together) and `sqs`
//!   (aws-sdk-sqs; needs a redrive policy).
//! - [`storage`]: buckets: `local` (a folder, atomic renames) and `s3`
//!   (streaming multipart uploads, aborted on failure; ranged concurrent
//!   downloads for inputs); and the worker's input cache
//!   ([`storage::cache`]): a SQLite index beside content-addressed files,
//!   one folder per bucket identity, placed in job folders as read-only
//!   links (jobs run as a job user), clones or copies, evicted least
//!   recently used first.
//! - [`tasks`]: post-tasks `s3_upload` and `http_post`.
//! - [`commands`]: built-ins (including the `render_demo` ray tracer),
//!   `process` programs run per job in their own process group, and
//!   `adaptor` programs kept running across jobs (JSON lines protocol in
//!   which every answer names its run); [`commands::usage`], what a
//!   program used (its exit's rusage read before it is reaped, an
//!   adaptor's run by `/proc`); and
//!   the [`commands::catalog`], what a job may ask for: the one validator
//!   used by both the submit half and the worker. It builds every command
//!   once; its errors are located in the file by [`config::Config::locate`].
//! - [`fleet`]: shutdown as a value (reason and deadline) that signals and
//!   IMDS notices feed, the drain to that deadline, scale-in protection and
//!   the lifecycle hook, GPU slots; the IMDS watcher tells EC2 by its DMI
//!   data and reads notices, rebalance recommendations included.
//! - [`events`]: publishing lifecycle events through bounded buffers
//!   (`buffer`: in events for a target, in bytes for the status table), the
//!   one observer of a job's end, `/metrics`, the job-status table (its
//!   fold, reads and prune; arrays keep their children's counts by state;
//!   written off the job's path, one transaction per lingering batch, a
//!   job's row read and written once per batch)
//!   and `events watch`, and the ledger (reported tries, cancelled jobs,
//!   array children's final states and budgeted arrays' costs: SQLite
//!   beside the embedded queue, S3 conditional writes for SQS) that makes
//!   exactly one `ArrayJobCompleted` (per revision) and one
//!   `BudgetReached`, keeps what a re-render of an array needs from its
//!   submit, and keeps held jobs (dependants waiting for their parents,
//!   jobs held by hand) with their messages ready to send (SQLite on the
//!   embedded queue, S3 objects under `deps/` for SQS, where a hold by
//!   hand catches the queued messages at receive; a dependant of a
//!   parent on another queue of the same backend is held in its own
//!   queue's ledger, and the parent's ledger notes which queues wait for
//!   it). The ledger
//!   and the status table are pruned after `queue_manager.retention`.
//! - [`worker`]: the listen half: a step function plus slot loops,
//!   heartbeat, back-off, drain on shutdown (`worker::execute` runs one
//!   job after `worker::staging` placed its inputs, `worker::settle`
//!   decides its message's fate, `worker::heartbeat` keeps it invisible
//!   and stops it when cancelled or lost, `worker::cancel` is what the worker
//!   knows of cancels, `worker::intake` receives for every slot in
//!   priority order, [`worker::thumbs`] makes image outputs' thumbnails
//!   in a sandboxed child process;
//!   `worker::sweep` counts the jobs the redrive policy dead-lettered;
//!   `worker::release` sends (or cancels) the dependants a job's end
//!   freed, on its own queue and on the other queues the worker's config
//!   opens, and sweeps what a dead worker freed and never sent, and the
//!   dependants of other queues' parents that no settling worker reached;
//!   `worker::usage` puts a try's usage together (the slot's GPU sampled,
//!   the instance from IMDS, the price) and adds an array's costs to its
//!   budget;
//!   [`worker::health`] judges the worker by how its tries ended (pure:
//!   which jobs it declines, whether it is sick) and holds the flag a sick
//!   worker raises for its slots, `/healthz` and the autoscaling group;
//!   a [`worker::delivery`] is a received message with its envelope
//!   parsed once).
//! - [`api`]: the submit half: the HTTP router (auth, JSON bodies only,
//!   body limit, `/healthz`) and [`api::guard`], the `Host` and cross-site
//!   checks every listener sits behind; JSON-RPC 2.0 types and dispatch
//!   with no HTTP, and the submit itself (pin the inputs with one `HEAD`
//!   each, validate against the catalog and the `[queue_manager]` limits,
//!   then send; array jobs are cut into
//!   children and sent a batch at a time; `depends_on` is checked and held
//!   in the ledger by `api::depends`); [`api::control`] cancels and
//!   redrives, and [`api::holds`] holds and releases, for the endpoint and
//!   the command line; [`api::rerender`] sends chosen frames of an array
//!   again, as its next revision, from the ledger's record of its submit.
//! - [`ui`]: the web monitor at `/ui`: pages from the status table (its
//!   own read-only connections, [`ui::board`], every list on an index),
//!   an array as a paged grid of frames, live through server-sent events
//!   (a capped number of streams, each of limited age), sign-in by signed,
//!   expiring session cookies, thumbnails from the ledgers, redrive and
//!   cancel through [`api::control`], the grid's Re-render through
//!   [`api::rerender`]; lists filtered by name, owner and metadata value.
//! - [`app`]: builds all of the above from a config and runs `serve` or
//!   `worker`; [`cli`] (with its endpoint [`cli::client`]) and
//!   [`bench`](mod@bench) are the command line.
//! - Outside `src/`, in Python: `clients/python/` (the endpoint's methods
//!   as a client whose errors carry the JSON-RPC code and `data.field`;
//!   `attach`, which writes Deadline Cloud manifests and uploads only the
//!   `Data/` objects a bucket lacks) and `clients/blender/` (the Blender
//!   add-on, which runs that client; `renderq-submit-blender`), tested
//!   from `tests/clients.rs` and `tests/blender_addon.rs`.
//!
//! # Invariants
//!
//! - Only the worker deletes messages, and only after the command and every
//!   post-task succeeded, or when the job was cancelled. The submit half
//!   never receives, and deletes only the queued messages of a job it
//!   cancels on the embedded queue.
//! - A job whose receipt went stale (another worker received its message)
//!   is stopped at that heartbeat: no two copies run on side by side. The
//!   heartbeat is stopped, and an extension in flight waited for, before
//!   a message is settled.
//! - A cancelled job never retries, never dead-letters and uploads nothing
//!   after its cancel was seen: a worker checks on receive and at every
//!   heartbeat tick (reading the ledger at most once a period, never once
//!   per message). The embedded ledger never numbers two cancels alike,
//!   pruned or not, so a worker reading on from the last it saw misses none.
//! - An id that comes in (a cancel, a redrive, a status query) is parsed
//!   into its one spelling ([`job::id::Id`]) before it is recorded or
//!   compared, or refused, naming it, before anything changes.
//! - A redrive deletes from the dead-letter queue exactly the dead letters
//!   it sent back, and sends them naming the id the submit returned.
//! - Every job is validated twice: at submit, and on receive (messages can be
//!   inserted straight into the queue), against the one
//!   [`commands::catalog`]: its command and parameters, its tasks, and its
//!   inputs (only from the buckets its queue's `input_buckets` allow). A
//!   job that fails validation never runs; on receive it is dead-lettered at
//!   once with its reason.
//! - A retryable failure leaves the message in the queue with a back-off
//!   delay; when the last allowed try fails the worker dead-letters it with
//!   its reason. The queue's redrive policy catches jobs of workers that
//!   died.
//! - A job's tries are counted across hand-backs: an interruption uses none,
//!   and the envelope carries the ones used before (`failures`) and the id
//!   the submit returned (`message_id`), which logs and `dlq list` show.
//! - No single message stops a queue: one the worker cannot decode is
//!   dead-lettered with its reason, never retried as a queue error.
//! - A receive already sent is never abandoned (a message handed to it
//!   would be hidden for a whole visibility timeout); only waiting is cut
//!   short by shutdown.
//! - Nothing an external program starts outlives its job, nor its worker: it
//!   runs in its own process group, killed when the job ends, recorded on
//!   disk, and killed by the worker's reaper (or the next worker's sweep) if
//!   the worker dies first. Its parent-death signal is SIGKILL.
//! - An adaptor's answer is taken only for the run it names, once: each
//!   process is at a turn (idle, running a run, cancelling it), and one
//!   that answers for another run, twice, or while idle is killed and never
//!   pooled again. The job it was running did nothing wrong: it is handed
//!   back without using a try.
//! - Shutdown is one value (reason, deadline): it stops receiving; a job that
//!   cannot finish by the deadline is cancelled and handed back without
//!   using up a try; the worker is gone before the deadline (jobs are
//!   cancelled early enough for their grace and hand-back, adaptors stopped
//!   together, events flushed with what is left, and the lifecycle hook
//!   completed after them).
//! - No async thread waits for SQLite: the embedded queue's short work runs
//!   there only while it meets no lock held elsewhere, and is otherwise
//!   done again on a blocking thread; its checkpoints (with their fsyncs)
//!   and whole-queue scans always run on blocking threads. Job folders are
//!   removed on blocking threads too, whoever drops the last output.
//! - Every HTTP listener (the endpoint, a worker's metrics port) is put
//!   behind [`api::guard`]: a request naming another `Host`, or a POST from
//!   another site, reaches no route. A worker's metrics port serves the
//!   monitor only when `[metrics] ui` asks, and then behind the sign-in.
//! - A worker gives back unrun, without using a try, the messages of a job
//!   it failed `worker.blocklist_after` times, and takes no job at all once
//!   it failed `worker.sick_after` tries in a row (of two jobs or more):
//!   the failures counted against a job are only tries that ran. A sick
//!   worker stays sick until it is restarted.
//! - Publishing an event never waits: a full buffer drops (and counts).
//!   A target's buffer is bounded in events; the status table's in bytes
//!   (`events.status_buffer`, large), so a burst reaches it whole.
//!   The status table lags its events by at most one batch (what arrived
//!   within `STATUS_LINGER`, 50 ms, of the batch's first event, and its
//!   commit): a read right after a job ended may not show that end yet.
//!   A target is sent again only what it refused, never what it took.
//! - What one request costs is bounded before anything is expanded, built or
//!   sent: frames are measured range by range, every child is sized before
//!   the first goes out, and children are built a batch at a time.
//! - Of all workers settling an array's children, exactly one publishes its
//!   `ArrayJobCompleted`: the write that makes the last child final claims
//!   it (one transaction; on S3 one conditional write of the array's state
//!   object, so a child costs a constant number of calls). A re-render is
//!   counted as an array of its own (`ID.rN`), so each revision is
//!   announced exactly once, with `revision` in its detail. A child is
//!   recorded before its message is settled, so no child is final in the
//!   queue but not in the ledger; one the redrive policy moved is counted
//!   by the dead-letter sweep.
//! - A held job or child is released (its message sent) or cancelled
//!   exactly once across workers: a parent unit's end deletes its edges in
//!   the same transaction that counts them off the dependants, and the
//!   write that brings one to zero claims it (`releasing`); its message is
//!   sent only after that claim, and the row marked `released` after the
//!   send. A claim a worker died holding is taken by one sweeper after
//!   `release_grace`. On S3 the held object is the set of parent units it
//!   waits for, changed only by `If-Match` writes: a unit spent twice is
//!   spent once, the write that empties the set claims it (with a claim id
//!   and a `releasing/` marker written first), and the sweep re-stamps a
//!   stale marker whose claim is stale too with `If-Match` so one sweeper
//!   takes it; a stale marker whose claim never landed has the sweep spend
//!   the ended units the object still waits for, under its own claim. An `on:
//!   success` dependant of a unit that did not succeed is cancelled with
//!   the parent's id and child in its reason, and ends as a parent in
//!   turn: nothing waits for a parent that ended. A parent on another
//!   queue changes only who spends the edges: they are in the dependant's
//!   ledger and spent there by the same transaction, by the parent's
//!   settling worker when its config opens that queue, else by the
//!   dependant queue's sweep from the parent ledger's ends; a submit reads
//!   those ends again after writing its edges and the parent ledger's
//!   note, and a settle reads the note after writing its end, so one of
//!   the two sees the other. A parent's end is read (on S3 with a
//!   `releasing/` marker per held object) after its end is recorded and
//!   before its message is settled, and spent after the settle: a worker
//!   that dies before the settle leaves the message to come back
//!   (spending is idempotent), one that dies after leaves markers or
//!   claims for the sweep. On S3
//!   the edges a process keeps from a parent's first listing are only a
//!   head start: every settle still lists the unit's edges and the
//!   parent's markers after its end is recorded, and spends what the kept
//!   ones lacked.
//! - No secret is read from `workers.toml` or written to a log.
//! - A job's inputs cannot reach outside its folder (paths and keys are
//!   checked at submit and again on receive), and nothing a job does to its
//!   own inputs changes what a later job receives: running as a job user it
//!   gets read-only hard links to blobs the worker owns (mode 0444, so it
//!   cannot write, `chmod` or `utime` them), running as the worker's user a
//!   reflink or plain copy, never the blob's inode; and no blob is visible
//!   before its hash and size were checked. (A job running as the cache's
//!   owner can still reach the cache's folder itself; a job user cannot.)
//! - Who owns what is decided in [`access`], once: with `run_as` a job's
//!   programs run as that user with its own groups and none of the
//!   worker's, and hold no capability; its folder is its own (0700); the
//!   worker's state is the worker's and out of its reach by mode (the
//!   cache, embedded queues' folders and local buckets 0700, the status
//!   table and events files 0600, the worker's folder under `work_dir`
//!   0711 so a job reaches its own folder but lists no other, process
//!   records 0600). A worker that cannot switch to the user does not start.
//! - A job's inputs are pinned at submit: the submit half records each
//!   object's and manifest's ETag and version (a folder's: size and
//!   mtime) in the job, every child of an array carries the same pin, and
//!   a worker fetches only that version (`If-Match`, `versionId`); one
//!   changed since submit fails the job for good, never renders instead.
//!   A hit for a pinned input makes no request.
//! - A cached blob is served only to jobs reading a bucket of the same
//!   identity (endpoint, region, bucket name; a folder's path), never by
//!   the bucket's name in `workers.toml`, and only for the key the job
//!   would have fetched. A size that lies (above `max_size`, or not the
//!   cached blob's) fails that job and evicts nothing. Eviction never
//!   reaches a running job's inputs: they are its own files.
//! - The monitor's pages cost the same with a week of history as with an
//!   hour: every list walks an index of the status table (a filter by name,
//!   owner or metadata value too), an array's page shows a bounded page of
//!   its frames (each index read with its revisions, at most
//!   `max_revisions`), and no size read from the table is taken beyond
//!   `max_frames`.
//! - A re-render sends only what the array's submit recorded in the ledger
//!   (its pinned inputs included), never what the status table says; each
//!   revision number is taken once, across processes.
//! - A thumbnail never fails a job, nor stops its worker: no worker
//!   decodes an output. Image outputs are decoded in a child process (the
//!   binary re-run as the hidden `renderq thumbnail`, as the job user)
//!   under `RLIMIT_AS`, `RLIMIT_CPU` and a wall-clock bound, after its
//!   header was checked against a pixel budget; a refusal, a crash or a
//!   timeout is a missing thumbnail and one warning.
//! - Measuring a try never fails or delays its job: what cannot be read
//!   (a built-in's CPU, a GPU whose `nvidia-smi` fails or hangs) is left
//!   out of its `usage`, each `nvidia-smi` query is bounded and killed
//!   when the run ends, and a failing GPU query warns once per worker.
//! - Of all workers adding a budgeted array's costs, exactly one publishes
//!   its `BudgetReached` and holds its unstarted children (on both
//!   backends): the write that takes the sum to
//!   the budget claims it (one transaction; on S3 one conditional write
//!   of the array's cost object).
//! - The monitor changes nothing without a POST carrying the CSRF token of
//!   its cookie (and, with a token configured, the sign-in cookie).
//! - The Python client's `attach` uploads an object only when the bucket
//!   lacks its key, and every object appears whole (an S3 PUT or a
//!   completed multipart upload; a local bucket's rename), so the attach
//!   after an interrupted one sends exactly what is missing; its manifests
//!   are named by their content. A submit through the add-on checks the
//!   token and the command before uploading anything.

pub mod access;
pub mod api;
pub mod app;
pub mod aws;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod events;
pub mod fleet;
pub mod job;
pub mod queue;
pub mod retry;
pub mod sqlite;
pub mod storage;
pub mod tasks;
pub mod ui;
pub mod worker;
pub mod workspace;

/// This build's version, as `get_version` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An error and all its causes, `outer: inner: innermost`.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
