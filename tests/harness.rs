//! A small harness: a throw-away farm (config, queue, bucket in a temporary
//! folder, a free port) and helpers to run the binary against it.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_renderq");

/// A file in the repository, for configs that name example programs.
pub fn repo_path(relative: &str) -> String {
    format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"))
}

/// Which queue and bucket backends a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded queue and a local folder.
    Local,
    /// SQS and S3, served by moto.
    Sqs,
}

/// Static credentials for moto, handed to every process we start.
pub const AWS_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// Says that a test is skipped because `what` is not installed (`how`
/// installs it): a failure under CI, where `.ci/run` installs everything;
/// elsewhere one line on the terminal. The line bypasses the test harness's
/// capture (which would hide it behind the test's `ok`), so a skip is seen.
pub fn skip(what: &str, how: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} is missing under CI: {how}"
    );
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {what} is not installed ({how})"
    );
}

/// Forks `command` from a thread that lives as long as the test binary, with
/// SIGKILL as its parent-death signal: servers never outlive the tests.
pub fn spawn_owned(mut command: Command) -> Child {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::spawn(move || {
            for (mut command, reply) in rx {
                // SAFETY: prctl is async-signal-safe; nothing else runs
                // between fork and exec.
                unsafe {
                    command.pre_exec(|| {
                        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                            .map_err(std::io::Error::from)
                    });
                }
                let _ = reply.send(command.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    command.stdout(Stdio::null()).stderr(Stdio::null());
    spawner.lock().unwrap().send((command, tx)).unwrap();
    rx.recv().unwrap().expect("spawn server")
}

/// Runs `renderq ARGS --config CONFIG` with `env`, asserts that it
/// succeeded (showing its stderr if not), and returns its stdout.
pub fn renderq_ok(args: &[&str], config: &std::path::Path, env: &[(&str, &str)]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .expect("run renderq");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A moto server (SQS and S3) on a loopback port.
pub struct Moto {
    pub port: u16,
    child: Mutex<Option<Child>>,
}

impl Moto {
    /// The server most tests share; each test uses fresh queue and bucket
    /// names, so they can run in parallel.
    pub fn shared() -> &'static Moto {
        static SHARED: OnceLock<Moto> = OnceLock::new();
        SHARED.get_or_init(|| Moto::start_on(free_port()))
    }

    pub fn start_on(port: u16) -> Moto {
        let moto = Moto {
            port,
            child: Mutex::new(None),
        };
        moto.start();
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts (or restarts) the server and waits until it accepts requests.
    pub fn start(&self) {
        let mut command = Command::new("python3");
        // moto's server with atomic conditional writes, as S3 has them.
        command.args([
            &repo_path("tests/fixtures/moto_server.py"),
            "-H",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
        ]);
        *self.child.lock().unwrap() = Some(spawn_owned(command));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SDK clients for checking SQS and S3 from the test itself.
#[derive(Clone)]
pub struct Aws {
    pub sqs: aws_sdk_sqs::Client,
    pub s3: aws_sdk_s3::Client,
    pub queue_url: String,
    pub dlq_url: String,
    pub bucket: String,
}

pub async fn aws_clients(endpoint: &str) -> (aws_sdk_sqs::Client, aws_sdk_s3::Client) {
    let credentials =
        aws_sdk_sqs::config::Credentials::new("testing", "testing", None, None, "tests");
    let region = aws_sdk_sqs::config::Region::new("us-east-1");
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version_latest()
            .endpoint_url(endpoint)
            .region(region.clone())
            .credentials_provider(credentials.clone())
            .build(),
    );
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version_latest()
            .endpoint_url(endpoint)
            .region(region)
            .credentials_provider(credentials)
            .force_path_style(true)
            .build(),
    );
    (sqs, s3)
}

impl Aws {
    /// Creates a fresh queue with a dead-letter queue and redrive policy,
    /// and a fresh bucket.
    pub async fn create(endpoint: &str, max_receive_count: u32) -> Self {
        let name = format!(
            "renders-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        Self::create_named(endpoint, &name, max_receive_count).await
    }

    /// Creates the queue, dead-letter queue and bucket under `name` (again,
    /// after a server restart lost them).
    pub async fn create_named(endpoint: &str, name: &str, max_receive_count: u32) -> Self {
        let (sqs, s3) = aws_clients(endpoint).await;
        let name = name.to_owned();
        let dlq_url = sqs
            .create_queue()
            .queue_name(format!("{name}-dlq"))
            .send()
            .await
            .expect("create dead-letter queue")
            .queue_url
            .unwrap();
        let arn = sqs
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
            .clone();
        // renderq's budget is one below the redrive policy's count.
        let policy = json!({"deadLetterTargetArn": arn,
                            "maxReceiveCount": (max_receive_count + 1).to_string()});
        let queue_url = sqs
            .create_queue()
            .queue_name(&name)
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
                policy.to_string(),
            )
            .send()
            .await
            .expect("create queue")
            .queue_url
            .unwrap();
        s3.create_bucket()
            .bucket(&name)
            .send()
            .await
            .expect("create bucket");
        Self {
            sqs,
            s3,
            queue_url,
            dlq_url,
            bucket: name,
        }
    }
}

/// Knobs a scenario may turn; everything else is fast test defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub visibility_timeout: &'static str,
    pub retry_delay: &'static str,
    pub max_receive_count: u32,
    pub drain_timeout: &'static str,
    pub auth_token_env: Option<&'static str>,
    pub max_body_bytes: usize,
    /// More TOML (e.g. `[commands.NAME]` tables), appended to the config.
    pub extra_toml: String,
    /// More names for `allow_commands`.
    pub extra_allowed: Vec<&'static str>,
    /// More lines for the `[worker]` table.
    pub worker_toml: String,
    /// The `[worker]` table's bad-worker thresholds: out of the way by
    /// default (tests of retries and dead letters fail every try on one
    /// worker, which would blocklist the job and call the worker sick);
    /// empty for the product's defaults (`tests/bad_workers.rs`).
    pub health_toml: &'static str,
    /// More lines for the `[queue_manager]` table.
    pub queue_manager_toml: String,
    /// The SQS queue's `endpoint_url`, when it is not moto itself (a
    /// proxy in front of it).
    pub sqs_endpoint: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            visibility_timeout: "30s",
            retry_delay: "200ms",
            max_receive_count: 3,
            drain_timeout: "10s",
            auth_token_env: None,
            max_body_bytes: 262_144,
            extra_toml: String::new(),
            extra_allowed: Vec::new(),
            worker_toml: String::new(),
            health_toml: "blocklist_after = 1000\nsick_after = 1000",
            queue_manager_toml: String::new(),
            sqs_endpoint: None,
        }
    }
}

pub struct Farm {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub port: u16,
    pub backend: Backend,
    /// The SQS queue and S3 bucket, on the SQS backend.
    pub aws: Option<Aws>,
    /// Environment for every renderq process started.
    pub env: Vec<(String, String)>,
}

/// A child process killed when dropped, so a failing test leaves nothing.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("signal the process");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log shows `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log never showed {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An events file (`events.jsonl`) and an `assets` bucket (a folder), for
/// farms whose jobs bring inputs.
pub const AUDIT_AND_ASSETS: &str = r#"
[events.targets.audit]
kind = "file"
path = "events.jsonl"

[buckets.assets]
backend = "local"
path = "assets"
"#;

/// A server process killed when the test is done with it.
pub struct Server(pub std::process::Child);

impl Server {
    /// Starts a Python fixture as `SCRIPT PORT ARGS...` on a free port and
    /// waits until it listens; returns its URL.
    pub fn python(script: &str, args: &[&str]) -> (String, Self) {
        let port = free_port();
        let mut command = Command::new("python3");
        command
            .arg(repo_path(script))
            .arg(port.to_string())
            .args(args);
        let server = Server(spawn_owned(command));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "{script} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        (format!("http://127.0.0.1:{port}"), server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the fault proxy in front of moto: the `SendMessageBatch` entry
/// whose body holds `needle` is refused `times` times (-1: always).
/// Returns its endpoint and the file counting the entries it passed on
/// (see [`forwarded`]).
pub fn fault_proxy(
    moto: &Moto,
    needle: &str,
    times: i32,
    dir: &std::path::Path,
) -> (String, PathBuf, Server) {
    let count = dir.join("forwarded");
    let (url, server) = Server::python(
        "tests/fixtures/sqs_fault_proxy.py",
        &[
            &moto.port.to_string(),
            needle,
            &times.to_string(),
            &count.to_string_lossy(),
        ],
    );
    (url, count, server)
}

/// Batch entries the fault proxy passed on so far.
pub fn forwarded(count: &std::path::Path) -> u64 {
    std::fs::read_to_string(count)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Every file below `dir`, at any depth.
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Farm {
    pub async fn new(backend: Backend, settings: Settings) -> Self {
        let endpoint = match backend {
            Backend::Local => None,
            Backend::Sqs => Some(Moto::shared().endpoint()),
        };
        Self::with_endpoint(backend, settings, endpoint).await
    }

    /// A farm on the SQS backend of a given moto (e.g. one a test restarts).
    pub async fn on_moto(moto: &Moto, settings: Settings) -> Self {
        Self::with_endpoint(Backend::Sqs, settings, Some(moto.endpoint())).await
    }

    async fn with_endpoint(backend: Backend, settings: Settings, endpoint: Option<String>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let auth = settings
            .auth_token_env
            .map(|v| format!("auth_token_env = \"{v}\"\n"))
            .unwrap_or_default();
        let allowed: Vec<String> = ["get_version", "sleep", "render_demo"]
            .iter()
            .chain(&settings.extra_allowed)
            .map(|c| format!("\"{c}\""))
            .collect();
        let allowed = allowed.join(", ");
        let Settings {
            visibility_timeout,
            retry_delay,
            max_receive_count,
            drain_timeout,
            max_body_bytes,
            extra_toml,
            worker_toml,
            health_toml,
            queue_manager_toml,
            sqs_endpoint,
            ..
        } = settings;
        let aws = match &endpoint {
            Some(endpoint) => Some(Aws::create(endpoint, max_receive_count).await),
            None => None,
        };
        let storage = match (&aws, &endpoint) {
            (Some(aws), Some(endpoint)) => format!(
                r#"
[queues.renders]
backend = "sqs"
url = "{}"
endpoint_url = "{}"
region = "us-east-1"
status_bucket = "results"

[buckets.results]
backend = "s3"
bucket = "{}"
endpoint_url = "{endpoint}"
region = "us-east-1"
"#,
                aws.queue_url,
                sqs_endpoint.as_deref().unwrap_or(endpoint),
                aws.bucket
            ),
            _ => format!(
                r#"
[queues.renders]
backend = "local"
path = "queue"
max_receive_count = {max_receive_count}

[buckets.results]
backend = "local"
path = "results"
"#
            ),
        };
        let text = format!(
            r#"
[queue_manager]
allow_commands = [{allowed}]
default_queue = "renders"
listen_queue = "renders"
{queue_manager_toml}

[server]
listen = "127.0.0.1:{port}"
max_body_bytes = {max_body_bytes}
{auth}
[worker]
visibility_timeout = "{visibility_timeout}"
wait_time = "5s"
retry_delay = "{retry_delay}"
max_retry_delay = "2s"
drain_timeout = "{drain_timeout}"
work_dir = "work"
{health_toml}
{worker_toml}
{storage}
[events]
status = "status.sqlite3"

[http_post]
allow_hosts = ["127.0.0.1"]
attempts = 3
retry_delay = "50ms"
timeout = "5s"
{extra_toml}
"#
        );
        let config = dir.path().join("workers.toml");
        std::fs::write(&config, text).expect("write config");
        std::fs::create_dir_all(dir.path().join("work")).expect("make work_dir");
        let env = match backend {
            Backend::Local => vec![],
            Backend::Sqs => AWS_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        Self {
            dir,
            config,
            port,
            backend,
            aws,
            env,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// Starts `renderq <subcommand>` against this farm; logs go to a file.
    pub fn spawn(&self, subcommand: &str, env: &[(&str, &str)]) -> Proc {
        self.spawn_with(subcommand, env, &self.config)
    }

    /// A copy of the config with `edit` applied, beside the original.
    pub fn config_variant(&self, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(&path, edit(text)).expect("write config");
        path
    }

    /// Starts `renderq <subcommand>` with another config.
    pub fn spawn_with(
        &self,
        subcommand: &str,
        env: &[(&str, &str)],
        config: &std::path::Path,
    ) -> Proc {
        self.spawn_as(None, subcommand, env, config)
    }

    /// Starts `renderq <subcommand>`, as `user` when given (through
    /// `setpriv`, with the user's own groups; see [`unprivileged_user`]).
    pub fn spawn_as(
        &self,
        user: Option<&str>,
        subcommand: &str,
        env: &[(&str, &str)],
        config: &std::path::Path,
    ) -> Proc {
        self.spawn_holding(user, None, subcommand, env, config)
    }

    /// [`Farm::spawn_as`], the user also holding `caps` (`setpriv`'s
    /// spelling, `+setuid,+kill`) as ambient capabilities, as systemd's
    /// `AmbientCapabilities` gives them.
    fn spawn_holding(
        &self,
        user: Option<&str>,
        caps: Option<&str>,
        subcommand: &str,
        env: &[(&str, &str)],
        config: &std::path::Path,
    ) -> Proc {
        let log = self
            .dir
            .path()
            .join(format!("{subcommand}-{}.log", uuid::Uuid::new_v4()));
        let mut command = match user {
            None => Command::new(BIN),
            Some(user) => {
                let mut command = Command::new("setpriv");
                command.args(["--reuid", user, "--regid", user, "--init-groups"]);
                if let Some(caps) = caps {
                    command.args(["--inh-caps", caps, "--ambient-caps", caps]);
                }
                command
                    .arg("--")
                    .arg(BIN)
                    // Programs the user can reach (root's own may be in
                    // folders it cannot enter).
                    .env("PATH", "/usr/local/bin:/usr/bin:/bin");
                command
            }
        };
        let child = command
            .arg(subcommand)
            .arg("--config")
            .arg(config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn renderq");
        Proc { child, log }
    }

    /// Starts `renderq serve` and waits until it answers /healthz.
    pub async fn serve(&self, env: &[(&str, &str)]) -> Proc {
        self.serve_with(env, &self.config).await
    }

    /// `serve` on another config (see `config_variant`).
    pub async fn serve_with(&self, env: &[(&str, &str)], config: &std::path::Path) -> Proc {
        self.healthy(self.spawn_with("serve", env, config)).await
    }

    /// `serve` as `user` holding `caps` as ambient capabilities (see
    /// [`Farm::spawn_holding`]), who is given the farm's folder first.
    pub async fn serve_holding(&self, user: &str, caps: &str) -> Proc {
        self.give_to(user);
        self.healthy(self.spawn_holding(Some(user), Some(caps), "serve", &[], &self.config))
            .await
    }

    /// Gives the farm's folder to `user`.
    pub fn give_to(&self, user: &str) {
        let status = Command::new("chown")
            .args(["-R", &format!("{user}:{user}")])
            .arg(self.dir.path())
            .status()
            .expect("chown");
        assert!(status.success(), "chown the farm to {user}");
    }

    /// `serve` as `user`, who is given the farm's folder first.
    pub async fn serve_as(&self, user: &str) -> Proc {
        self.give_to(user);
        self.healthy(self.spawn_as(Some(user), "serve", &[], &self.config))
            .await
    }

    /// Waits until `proc` answers /healthz.
    async fn healthy(&self, proc: Proc) -> Proc {
        let health = format!("{}healthz", self.url());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if reqwest::get(&health)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return proc;
            }
            assert!(
                Instant::now() < deadline,
                "serve never became healthy:\n{}",
                proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Runs a one-shot CLI command; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_with(&self.config, args)
    }

    /// A one-shot CLI command with another config (see `config_variant`).
    pub fn cli_with(&self, config: &std::path::Path, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run renderq");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `(visible, in_flight, dead_lettered)` from `renderq queue stats`.
    pub fn stats(&self) -> (u64, u64, u64) {
        let (code, out, err) = self.cli(&["queue", "stats", "--queue", "renders"]);
        assert_eq!(code, 0, "queue stats failed: {err}");
        let field = |name: &str| -> u64 {
            out.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {out:?}"))
        };
        (field("visible"), field("in_flight"), field("dead_lettered"))
    }

    /// Posts a raw body to the endpoint.
    pub async fn post_raw(
        &self,
        body: impl Into<reqwest::Body>,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut request = reqwest::Client::new()
            .post(self.url())
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("post")
    }

    /// Calls a JSON-RPC method and returns the whole reply.
    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        let body = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
        self.post_raw(body.to_string(), None)
            .await
            .json()
            .await
            .expect("JSON reply")
    }

    /// Submits a job and returns its message id.
    /// `queue_manager_job_status` of `id` once the status table has it
    /// ended (a job final, an array completed): the table is written a
    /// batch at a time, a little after the events. The last answer after
    /// 10 s otherwise.
    pub async fn final_status(&self, id: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = self
                .rpc("queue_manager_job_status", json!({"job_id": id}))
                .await;
            let result = &status["result"];
            let ended = result["completed"] == true
                || ["succeeded", "dead_lettered", "cancelled"]
                    .contains(&result["state"].as_str().unwrap_or_default());
            if ended || std::time::Instant::now() > deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn submit(&self, job: Value) -> String {
        let reply = self.rpc("queue_manager_submit_job", job).await;
        reply["result"]
            .as_str()
            .unwrap_or_else(|| panic!("submit failed: {reply}"))
            .to_owned()
    }

    /// The events a `file` target at `events.jsonl` (in the farm's folder)
    /// received so far.
    pub fn events(&self) -> Vec<Value> {
        let text =
            std::fs::read_to_string(self.dir.path().join("events.jsonl")).unwrap_or_default();
        // A line being appended right now is not read yet.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|line| serde_json::from_str(line).expect("an event is JSON"))
            .collect()
    }

    /// Waits until `count` events pass `filter`; returns them.
    pub async fn wait_for_events(
        &self,
        filter: impl Fn(&Value) -> bool,
        count: usize,
        timeout: Duration,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<Value> = self.events().into_iter().filter(|e| filter(e)).collect();
            if found.len() >= count {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {count} events arrived: {found:?}",
                found.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The workers' `work_dir`.
    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// Every job and adaptor folder under `work_dir` (each worker process
    /// keeps its own in a folder of its own).
    pub fn job_folders(&self) -> Vec<PathBuf> {
        let children = |dir: PathBuf| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        children(self.work_dir())
            .into_iter()
            .flat_map(children)
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with("renderq-job-") || n.starts_with("renderq-adaptor-")
                })
            })
            .collect()
    }

    /// The local bucket's folder (local backend only).
    pub fn bucket_root(&self) -> PathBuf {
        self.dir.path().join("results")
    }

    /// An object's bytes and content type, if it exists.
    pub async fn object(&self, key: &str) -> Option<(Vec<u8>, String)> {
        match &self.aws {
            None => {
                let bucket = renderq::storage::LocalBucket::new("results", &self.bucket_root());
                let bytes = std::fs::read(self.bucket_root().join(key)).ok()?;
                Some((bytes, bucket.content_type(key)?))
            }
            Some(aws) => {
                let object = aws
                    .s3
                    .get_object()
                    .bucket(&aws.bucket)
                    .key(key)
                    .send()
                    .await
                    .ok()?;
                let content_type = object.content_type.clone().unwrap_or_default();
                let bytes = object.body.collect().await.ok()?.into_bytes().to_vec();
                Some((bytes, content_type))
            }
        }
    }

    /// Waits for an object to appear in the results bucket; returns its
    /// bytes and content type.
    pub async fn wait_for_object(&self, key: &str, timeout: Duration) -> (Vec<u8>, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.object(key).await {
                return found;
            }
            assert!(Instant::now() < deadline, "object {key} never appeared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the queue holds nothing visible or in flight.
    pub async fn wait_until_drained(&self, timeout: Duration) -> (u64, u64, u64) {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats();
            if stats.0 == 0 && stats.1 == 0 {
                return stats;
            }
            assert!(Instant::now() < deadline, "queue never drained: {stats:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a raw message body straight into the queue, bypassing the
    /// submit half; returns its message id.
    pub async fn insert(&self, body: &str) -> String {
        match &self.aws {
            None => {
                let config = renderq::config::Config::load(&self.config).expect("config");
                let queue = renderq::queue::Queue::open("renders", &config.queues["renders"])
                    .await
                    .expect("open queue");
                queue.send(body).await.expect("send")
            }
            Some(aws) => aws
                .sqs
                .send_message()
                .queue_url(&aws.queue_url)
                .message_body(body)
                .send()
                .await
                .expect("send")
                .message_id
                .unwrap(),
        }
    }
}

/// What a test HTTP server received.
#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    pub content_type: String,
    pub body: Vec<u8>,
    pub headers: axum::http::HeaderMap,
}

/// A local HTTP server that records every POST and answers 500 (or another
/// status) to the first `failures` of them, then 200.
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    pub hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    pub async fn start(failures: usize) -> Self {
        Self::answering(failures, axum::http::StatusCode::INTERNAL_SERVER_ERROR).await
    }

    /// Answers `status` to the first `failures` POSTs, then 200.
    pub async fn answering(failures: usize, status: axum::http::StatusCode) -> Self {
        use axum::extract::State;
        use axum::http::{HeaderMap, StatusCode, Uri};

        let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
        let app = axum::Router::new()
            .fallback(
                move |State(hits): State<Arc<Mutex<Vec<Hit>>>>,
                      uri: Uri,
                      headers: HeaderMap,
                      body: axum::body::Bytes| async move {
                    let mut hits = hits.lock().unwrap();
                    hits.push(Hit {
                        path: uri.path().to_owned(),
                        content_type: headers
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned(),
                        body: body.to_vec(),
                        headers,
                    });
                    if hits.len() <= failures {
                        status
                    } else {
                        StatusCode::OK
                    }
                },
            )
            .with_state(hits.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, hits }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

/// A farm with a `big_file` command writing `size_mib` of noise.
pub async fn big_file_farm(backend: Backend) -> Farm {
    let big_file = repo_path("tests/fixtures/big_file.py");
    Farm::new(
        backend,
        Settings {
            extra_toml: format!(
                r#"
[commands.big_file]
kind = "process"
program = "python3"
args = ["{big_file}", "{{size_mib}}", "{{workdir}}/big.bin"]
output = "{{workdir}}/big.bin"
[commands.big_file.parameters]
size_mib = {{ type = "integer", min = 1, max = 1024 }}
"#
            ),
            extra_allowed: vec!["big_file"],
            ..Settings::default()
        },
    )
    .await
}

/// A user without privileges for tests of a worker that is not root
/// (made with `useradd` the first time); `None`, with a line saying why,
/// when the tests do not run as root.
pub fn unprivileged_user() -> Option<&'static str> {
    const USER: &str = "renderq-test";
    // `/proc/self` belongs to the effective user.
    let euid =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").expect("/proc"));
    if euid != 0 {
        println!("SKIPPED: not root, so no worker can be started as another user");
        return None;
    }
    static MADE: OnceLock<()> = OnceLock::new();
    MADE.get_or_init(|| {
        let exists = || {
            Command::new("id")
                .arg(USER)
                .output()
                .is_ok_and(|out| out.status.success())
        };
        if !exists() {
            let out = Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home", USER])
                .output()
                .expect("useradd");
            // Another test binary may have made it meanwhile.
            assert!(
                out.status.success() || exists(),
                "useradd {USER}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
    Some(USER)
}

/// True while `pid` is a live (not zombie) process.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Decodes a PNG and returns its size.
pub fn png_size(bytes: &[u8]) -> (u32, u32) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().expect("a valid PNG");
    let info = reader.info();
    (info.width, info.height)
}

/// An event's `time`, in milliseconds since the epoch.
pub fn event_millis(event: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(event["time"].as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}
