//! The command line: argument types and what each subcommand does.

pub mod client;

use client::SubmitArgs;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use std::time::Duration;

use crate::app::App;
use crate::config::Config;
use crate::fleet::lifecycle::Shutdown;
use crate::job::id::Id;
use crate::queue::{Queue, Redrive};

#[derive(Debug, Parser)]
#[command(name = "renderq", version, about = "A queue manager for render farms")]
pub struct Cli {
    /// Path to workers.toml.
    #[arg(
        long,
        global = true,
        env = "RENDERQ_CONFIG",
        default_value = "workers.toml"
    )]
    pub config: PathBuf,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the JSON-RPC endpoint and a worker.
    Serve,
    /// Run only a worker on queue_manager.listen_queue.
    Worker,
    /// Submit a job to a running endpoint; prints the message id.
    Submit(SubmitArgs),
    /// Run one command once, with no queue and no post-tasks; prints where
    /// the result went and its MIME type.
    Run(RunArgs),
    /// Check workers.toml and open every queue and bucket it names.
    CheckConfig,
    /// Inspect queues.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Inspect or redrive a queue's dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Measure throughput and latency on the embedded queue.
    Bench(crate::bench::BenchArgs),
    /// Consume lifecycle events.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// A job's or an array's state, from the status table.
    Status {
        /// A job id, an array's id, or a message id.
        job_id: String,
    },
    /// Cancel a job, or every child of an array: queued ones never run,
    /// running ones are stopped. Prints what it did (JSON).
    Cancel {
        /// The id the submit returned for the job or the array.
        job_id: String,
        /// Only on this queue (default: every queue with a ledger).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Render chosen frames of an array again, with its original
    /// parameters, pinned inputs, tasks and notifications, as its next
    /// revision. Prints what it queued (JSON).
    Rerender {
        /// The array's id, as its submit returned it.
        job_id: String,
        /// The frames, as a spec: `12,40-45`.
        #[arg(long)]
        frames: String,
    },
    /// Hold a job, or an array's children not started yet, in the ledger
    /// (embedded queues): they stay out of the queue until `release`.
    Hold {
        /// The id the submit returned for the job or the array.
        job_id: String,
        /// Only on this queue (default: every embedded queue).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Release a job held by `hold`: what waits for no parent is queued.
    Release {
        /// The id the submit returned for the job or the array.
        job_id: String,
        /// Only on this queue (default: every embedded queue).
        #[arg(long)]
        queue: Option<String>,
    },
    /// Delete the status table's and ledgers' records older than
    /// queue_manager.retention (serve and worker do it every hour).
    Prune,
    /// The thumbnail sandbox's child (run by the worker, not by people):
    /// an image on standard input, its JPEG thumbnail on standard output.
    #[command(hide = true)]
    Thumbnail {
        /// Refuse an image with more pixels than this, from its header.
        #[arg(long)]
        max_pixels: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Feed a `file` or `sqs` target into the status table (`[events]
    /// status`), skipping repeats and anything that is not an event.
    Watch {
        /// An `[events.targets.NAME]`.
        #[arg(long)]
        target: String,
        /// Stop when the target has nothing more for now.
        #[arg(long)]
        once: bool,
    },
}

impl Command {
    /// Whether this subcommand starts external programs (and so needs the
    /// reaper to clean up after a crash).
    pub fn runs_commands(&self) -> bool {
        matches!(self, Command::Serve | Command::Worker | Command::Run(_))
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// A built-in or [commands.NAME] command (it need not be allowed yet).
    pub command: String,
    /// Parameters: a JSON object, or file://PATH of one.
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// An adaptor's init data (replacing the config's): JSON or file://PATH.
    #[arg(long)]
    pub init_data: Option<String>,
    /// Where to write a file result: a file, or a folder for several
    /// (default: ./renderq-run/COMMAND-NAME.EXT). A single JSON or text
    /// result with no --output goes to stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Visible, in-flight and dead-lettered counts.
    Stats {
        /// One queue (default: all).
        #[arg(long)]
        queue: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// One line per dead-lettered message: id, receive count, reason.
    List(DlqArgs),
    /// Move dead-lettered messages back to their queue: all of them, one
    /// message, or one job's (an array's: every dead-lettered child).
    Redrive(RedriveArgs),
}

#[derive(Debug, Args)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub dlq: DlqArgs,
    /// Only the message with this id (the id the submit returned).
    #[arg(long, conflicts_with = "job")]
    pub message: Option<String>,
    /// Only this job's dead letters, or an array's (by its job id).
    #[arg(long)]
    pub job: Option<String>,
}

impl RedriveArgs {
    /// Which dead letters, checked: ids are UUIDs, in their one spelling.
    pub fn which(&self) -> anyhow::Result<Redrive> {
        let uuid = |flag: &str, id: &str| Id::parse(id).with_context(|| flag.to_owned());
        Ok(match (&self.message, &self.job) {
            (Some(id), _) => Redrive::Message(uuid("--message", id)?),
            (None, Some(id)) => Redrive::Job(uuid("--job", id)?),
            (None, None) => Redrive::All,
        })
    }
}

#[derive(Debug, Args)]
pub struct DlqArgs {
    /// Queue whose dead-letter queue to use (default: listen_queue).
    #[arg(long)]
    pub queue: Option<String>,
    /// At most this many messages.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
}

/// `renderq hold` and `renderq release`: prints what was done (JSON).
async fn hold_or_release(
    config: Config,
    job_id: &str,
    queue: Option<String>,
    hold: bool,
) -> anyhow::Result<()> {
    let app = App::build(config).await?;
    let report = if hold {
        app.control().hold(job_id, queue).await?
    } else {
        app.control().release(job_id, queue).await?
    };
    println!("{}", serde_json::to_string(&report)?);
    // Its events go out before exit.
    app.publisher.close(Duration::from_secs(10)).await;
    Ok(())
}

/// What a held job (or array) still waits for, from every queue's
/// ledger (on SQS its S3 objects): a line per parent. A bucket that
/// cannot be reached leaves the SQS queues' lines out.
async fn waits_for(config: &Config, job_id: &str) -> Vec<String> {
    let buckets = crate::storage::Buckets::open(&config.buckets)
        .await
        .unwrap_or_default();
    let Ok(ledgers) = crate::events::ledger::Ledgers::open(&config.queues, &buckets) else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    for (name, ledger) in ledgers.iter() {
        let waits = ledger.parent_waits(job_id, name).await.unwrap_or_default();
        lines.extend(waits.iter().map(|wait| {
            format!(
                "waits_for\tparent={}\t{}\theld_children={}\tqueue={}",
                wait.parent_id,
                wait.what(),
                wait.held_children,
                wait.queue
            )
        }));
    }
    lines
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Every command but `bench` (which brings its own) needs the config.
    let path = cli.config;
    let load = || Config::load(&path);
    match cli.command {
        Command::Bench(args) => crate::bench::run(&args).await,
        Command::Thumbnail { .. } => {
            bail!("`renderq thumbnail` runs from main, before any runtime or thread starts")
        }
        Command::Serve => {
            let config = load()?;
            let drain = config.worker.drain_timeout;
            with_shutdown(drain, |s| async move {
                App::build(config).await?.serve(s).await
            })
            .await
        }
        Command::Worker => {
            let config = load()?;
            let drain = config.worker.drain_timeout;
            with_shutdown(
                drain,
                |s| async move { App::build(config).await?.work(s).await },
            )
            .await
        }
        Command::Submit(args) => crate::cli::client::submit(&load()?, args).await,
        Command::Prune => {
            let app = App::build(load()?).await?;
            let deleted = app.prune().await?;
            println!(
                "Pruned {deleted} records older than {}.",
                humantime::format_duration(app.config.queue_manager.retention)
            );
            Ok(())
        }
        Command::Events {
            command: EventsCommand::Watch { target, once },
        } => {
            let config = load()?;
            with_shutdown(Duration::ZERO, |stop| async move {
                let watched =
                    crate::events::watch::run(&config, &target, once, stop.token().clone()).await?;
                println!(
                    "applied={}\tduplicates={}\tskipped={}",
                    watched.applied, watched.duplicates, watched.skipped
                );
                Ok(())
            })
            .await
        }
        Command::Cancel { job_id, queue } => {
            let app = App::build(load()?).await?;
            let report = app.control().cancel(&job_id, queue).await?;
            println!("{}", serde_json::to_string(&report)?);
            // Its JobCancelled events (embedded queue) go out before exit.
            app.publisher.close(Duration::from_secs(10)).await;
            Ok(())
        }
        Command::Rerender { job_id, frames } => {
            let app = App::build(load()?).await?;
            let request = crate::api::rerender::RerenderRequest { job_id, frames };
            let done = app.submitter().rerender(request).await?;
            println!("{}", serde_json::to_string(&done)?);
            // Its JobSubmitted goes out before exit.
            app.publisher.close(Duration::from_secs(10)).await;
            Ok(())
        }
        Command::Hold { job_id, queue } => hold_or_release(load()?, &job_id, queue, true).await,
        Command::Release { job_id, queue } => hold_or_release(load()?, &job_id, queue, false).await,
        Command::Status { job_id } => {
            let config = load()?;
            let path = config
                .events
                .status
                .path()
                .context("no status table: [events] status is \"off\" in workers.toml")?;
            let job_id = Id::parse(&job_id)?.to_string();
            match crate::events::status::StatusTable::open(path)?.get(&job_id)? {
                Some(status) => {
                    println!("{status}");
                    for line in waits_for(&config, &job_id).await {
                        println!("{line}");
                    }
                    Ok(())
                }
                None => bail!("no job or array `{job_id}` in {}", path.display()),
            }
        }
        Command::Run(args) => {
            let config = load()?;
            with_shutdown(Duration::ZERO, |s| {
                run_once(config, args, s.token().clone())
            })
            .await
        }
        Command::CheckConfig => {
            let app = App::build(load()?).await?;
            // Building the router reads the token variable the config names.
            let _ = app.router()?;
            let queues: Vec<_> = app.queues.names().collect();
            let commands: Vec<_> = app.catalog.commands().map(|c| c.name.as_str()).collect();
            println!(
                "{}: ok (queues: {}; commands: {})",
                path.display(),
                queues.join(", "),
                commands.join(", ")
            );
            Ok(())
        }
        Command::Queue {
            command: QueueCommand::Stats { queue },
        } => {
            let app = App::build(load()?).await?;
            let names: Vec<String> = match queue {
                Some(name) => vec![name],
                None => app.queues.names().map(str::to_owned).collect(),
            };
            for name in names {
                let stats = queue_named(&app, &name)?.stats().await?;
                println!(
                    "{name}\tvisible={}\tin_flight={}\tdead_lettered={}",
                    stats.visible, stats.in_flight, stats.dead_lettered
                );
            }
            Ok(())
        }
        Command::Dlq { command } => {
            let app = App::build(load()?).await?;
            let default = app.config.queue_manager.listen_queue.clone();
            match command {
                DlqCommand::List(args) => {
                    let queue = queue_named(&app, args.queue.as_deref().unwrap_or(&default))?;
                    let dead_letters = queue.dlq_list(args.limit).await?;
                    if dead_letters.is_empty() {
                        eprintln!("no dead-lettered messages in {}", queue.name());
                    }
                    for dead in dead_letters {
                        println!(
                            "{}\t{}\t{}",
                            dead.message_id, dead.receive_count, dead.reason
                        );
                    }
                }
                DlqCommand::Redrive(args) => {
                    let which = args.which()?;
                    let queue = queue_named(&app, args.dlq.queue.as_deref().unwrap_or(&default))?;
                    let moved = queue.dlq_redrive(args.dlq.limit, &which).await?;
                    println!("redrove {moved} message(s) to {}", queue.name());
                }
            }
            Ok(())
        }
    }
}

fn queue_named<'a>(app: &'a App, name: &str) -> anyhow::Result<&'a Queue> {
    app.queues
        .get(name)
        .with_context(|| format!("no queue `{name}` in the config"))
}

/// Runs `body` with a shutdown that SIGINT or SIGTERM requests, with
/// `drain` to finish running work.
async fn with_shutdown<F, Fut>(drain: Duration, body: F) -> anyhow::Result<()>
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let shutdown = Shutdown::new();
    crate::fleet::lifecycle::stop_on_signal(shutdown.clone(), drain)?;
    body(shutdown).await
}

/// Reads `--params`-style input: inline JSON, or `file://PATH`.
fn json_arg(flag: &str, text: &str) -> anyhow::Result<serde_json::Map<String, Value>> {
    let text = match text.strip_prefix("file://") {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("{flag}: cannot read {path}"))?
        }
        None => text.to_owned(),
    };
    match serde_json::from_str(&text).with_context(|| format!("{flag} is not JSON"))? {
        Value::Object(map) => Ok(map),
        _ => bail!("{flag} must be a JSON object"),
    }
}

async fn run_once(
    mut config: Config,
    args: RunArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let params = json_arg("--params", &args.params)?;
    if let Some(init) = &args.init_data {
        match config.commands.get_mut(&args.command) {
            Some(crate::config::CommandConfig::Adaptor(adaptor)) => {
                adaptor.init_data = json_arg("--init-data", init)?;
            }
            _ => bail!("--init-data is only for adaptor commands"),
        }
    }
    let command =
        crate::commands::catalog::command(&config, &args.command).map_err(|i| config.locate(i))?;
    let params = command
        .schema
        .apply(&params)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ctx = crate::commands::RunContext {
        cancel: shutdown,
        progress: crate::commands::Progress::new(),
        job_id: format!("run-{}", uuid::Uuid::new_v4()),
        frames: Vec::new(),
        gpu: None,
        workdir: None,
        usage: Default::default(),
    };
    let outputs = command.run(&params, &ctx).await;
    command.stop().await;
    let outputs = outputs.with_context(|| format!("{} failed", args.command))?;
    let several = outputs.len() > 1;
    // One JSON or text result with nowhere named goes to stdout.
    if let ([output], None) = (outputs.as_slice(), &args.output)
        && let crate::job::Body::Bytes(bytes) = &output.body
        && (output.mime.type_() == mime::TEXT || output.mime.subtype() == mime::JSON)
    {
        use std::io::Write;
        let mut stdout = std::io::stdout();
        stdout.write_all(bytes)?;
        if !bytes.ends_with(b"\n") {
            stdout.write_all(b"\n")?;
        }
        return Ok(());
    }
    for output in &outputs {
        let ext = crate::job::mime_ext(&output.mime);
        // Files go to `--output` (a folder for several), else under
        // ./renderq-run/, not loose in the working folder.
        let path = match (&args.output, several) {
            (Some(path), false) => path.clone(),
            (folder, _) => {
                let folder = folder
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("renderq-run"));
                std::fs::create_dir_all(&folder)
                    .with_context(|| format!("cannot make {}", folder.display()))?;
                folder.join(format!("{}-{}.{ext}", args.command, output.name))
            }
        };
        match &output.body {
            crate::job::Body::Bytes(bytes) => std::fs::write(&path, bytes),
            crate::job::Body::File(file) => std::fs::copy(file, &path).map(drop),
        }
        .with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}\t{}", path.display(), output.mime);
    }
    Ok(())
}
