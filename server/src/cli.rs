//! The `zerotouch` command line: argument definitions and the store sub-commands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_proto::{DeviceId, ModuleId};

use crate::admin;
use crate::backend::Backend;
use crate::config::{Settings, StoreLocation};
use crate::error::{RegistrationErrorKind, ServerError};

/// Runs `$body` with `$b` bound to the backend a [`StoreLocation`] names, opened read-only when
/// `$read_only`: a SQLite store otherwise syncing every commit (see
/// [`SqliteBackend::for_command`](crate::backend::SqliteBackend::for_command)), a PostgreSQL
/// database otherwise migrated (see [`PgBackend::for_command`](crate::backend::PgBackend::for_command)).
macro_rules! on_backend {
    ($location:expr, read_only: $read_only:expr, |$b:ident| $body:expr) => {{
        let location: StoreLocation = $location;
        match location.database_url {
            None => {
                crate::datadir::refuse_other_store(&location.data_dir)?;
                let $b = crate::backend::SqliteBackend::for_command(location.data_dir, $read_only);
                $body
            }
            Some(url) => {
                let $b = crate::backend::PgBackend::for_command(url.as_str(), $read_only)?;
                $body
            }
        }
    }};
}

/// Runs store command `$run` on the backend of `$location` (see [`on_backend!`]), printing what
/// it gives on stdout as it comes (one value, or a listing element by element).
macro_rules! printed {
    ($location:expr, read_only: $read_only:expr, $run:ident($command:expr)) => {{
        let location: StoreLocation = $location;
        let mut out = JsonOut::new(std::io::stdout().lock());
        let result = on_backend!(location, read_only: $read_only, |b| $run(&b, $command, &mut |v| out.element(&v)));
        out.end(result)
    }};
}

/// A self-hosted, wire-compatible Azure IoT Hub Device Provisioning Service with embedded hubs.
#[derive(Debug, Parser)]
#[command(name = "zerotouch", version, about)]
pub struct Cli {
    /// Log line format on stderr (filter with `RUST_LOG`, e.g. `RUST_LOG=zerotouch=debug`);
    /// default `text`, or for `serve` the `log-format` of its `--config` file.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log format to start with: `--log-format`, else for `serve` its config file's
    /// `log-format`, else text.
    ///
    /// Logging starts before the command runs, so `serve` reads its file here, once (a pipe such
    /// as `--config <(…)` can be read only once), and keeps what it read for [`run`]; a file that
    /// cannot be read or parsed gives no format, and `serve` reports why once logging runs.
    pub fn initial_log_format(&mut self) -> LogFormat {
        let from_file = match &mut self.command {
            Command::Serve(args) => args.read_config().as_ref().ok().and_then(|file| file.log_format),
            _ => None,
        };
        self.log_format.or(from_file).unwrap_or(LogFormat::Text)
    }
}

/// Log line formats (`--log-format`, `log-format = "json"` in a `serve` config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the provisioning service (MQTT/TLS, HTTPS, MQTT over WebSockets) and embedded hubs.
    Serve(ServeArgs),
    /// Manage enrollments in the store.
    #[command(subcommand)]
    Enrollments(EnrollmentsCommand),
    /// Read device identities from the embedded hubs' registries.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Read device twins from the embedded hubs.
    #[command(subcommand)]
    Twins(TwinsCommand),
    /// Act as a device.
    #[command(subcommand)]
    Device(DeviceCommand),
}

/// `zerotouch serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with the same keys as the flags (`data-dir = "…"`, `log-format = "json"`);
    /// flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The settings.
    #[command(flatten)]
    pub settings: Settings,
    /// The `--config` file as read (once), or why it could not be.
    #[arg(skip)]
    read: Option<Box<Result<Settings, ServerError>>>,
}

impl ServeArgs {
    /// The `--config` file's settings (defaults without `--config`), read on the first call only.
    fn read_config(&mut self) -> &Result<Settings, ServerError> {
        let path = self.config.as_deref();
        self.read.get_or_insert_with(|| {
            Box::new(match path {
                Some(path) => Settings::from_file(path),
                None => Ok(Settings::default()),
            })
        })
    }
}

/// The exit codes of the store commands (`enrollments`, `devices`, `twins`), shown in their help.
const STORE_EXIT_CODES: &str = "Exit codes: 0 done; 2 usage; 3 invalid input (a flag's value, an id, the \
                                contents of the `--config` file, an import file that cannot be read, is \
                                not a JSON array or has a bad entry; nothing is written); 4 not found (an \
                                enrollment, hub, device or module; no store in the data directory or \
                                database); 1 anything else (a `--config` file that cannot be read, a store \
                                that fails).";

/// Which store a store command acts on.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Data directory of the server (SQLite; default `./zerotouch-data`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL of the server's database instead; also read from
    /// `ZEROTOUCH_DATABASE_URL`, out of sight of `ps`.
    #[arg(long, value_name = "URL", env = "ZEROTOUCH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<crate::config::DatabaseUrl>,
    /// The server's TOML configuration file (`serve --config`): its `data-dir` and
    /// `database-url`, where the flags above give none.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl StoreArgs {
    /// The store these flags name.
    ///
    /// # Errors
    /// [`ServerError::Config`] when `--data-dir` is given while the URL comes only from
    /// `ZEROTOUCH_DATABASE_URL`.
    pub fn location(&self) -> Result<StoreLocation, ServerError> {
        // An exported ZEROTOUCH_DATABASE_URL must not quietly win over a --data-dir typed for
        // this command (a SQLite store, say, in a lab directory).
        let url_flag = std::env::args().any(|a| a == "--database-url" || a.starts_with("--database-url="));
        if self.data_dir.is_some() && self.database_url.is_some() && !url_flag {
            return Err(ServerError::Config(
                "--data-dir was given and ZEROTOUCH_DATABASE_URL is set: unset the variable to use the \
                 data directory's SQLite store, or drop --data-dir to use the database"
                    .into(),
            ));
        }
        let file = match &self.config {
            Some(path) => crate::config::Settings::from_file(path)?,
            None => crate::config::Settings::default(),
        };
        Ok(StoreLocation::new(
            self.data_dir.clone().or(file.data_dir),
            self.database_url.clone().or(file.database_url),
        ))
    }

    /// The store these flags name, which must exist already: a command that only reads would
    /// otherwise create an empty store at a mistyped path and report nothing found in it.
    ///
    /// # Errors
    /// [`ServerError::NotFound`] when the data directory holds no database (PostgreSQL URLs are
    /// checked when connecting); [`ServerError::Config`] for a directory whose server keeps its
    /// store elsewhere.
    pub fn existing_location(&self) -> Result<StoreLocation, ServerError> {
        let location = self.location()?;
        if location.database_url.is_none() {
            crate::datadir::refuse_other_store(&location.data_dir)?;
            let database = location.data_dir.join(crate::backend::SqliteBackend::DATABASE_FILE);
            if !database.is_file() {
                return Err(crate::backend::no_store(&database));
            }
        }
        Ok(location)
    }
}

/// `zerotouch enrollments …`.
#[derive(Debug, Subcommand)]
pub enum EnrollmentsCommand {
    /// Import a JSON array of enrollments (DPS service API schema); all or nothing.
    ///
    /// A symmetric-key entry without keys (or with one) keeps the keys it lacks from the
    /// enrollment it replaces; keys still missing are generated and printed once in the output
    /// (`generatedKeys`).
    #[command(after_help = STORE_EXIT_CODES)]
    Import {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// The file: individual enrollments have `registrationId`, groups `enrollmentGroupId`.
        file: PathBuf,
    },
    /// Print every enrollment as a JSON array in the import file's shape, keys left out; an
    /// individual enrollment whose device registered carries its `registrationState` (why a
    /// registration failed, where it was assigned), and every enrollment its
    /// `provisioningStatus` (`enabled` when imported without one), as DPS reads show them.
    #[command(after_help = STORE_EXIT_CODES)]
    List {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Include the symmetric keys (to move enrollments to another store).
        #[arg(long)]
        with_keys: bool,
    },
    /// Delete an individual enrollment or an enrollment group. Its devices' hub identities and
    /// registration records stay (as in DPS); their next registration is refused, unless a
    /// group still covers them.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["registration_id", "enrollment_group_id"])))]
    #[command(after_help = STORE_EXIT_CODES)]
    Delete {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// The individual enrollment's registration id.
        #[arg(long, value_name = "ID")]
        registration_id: Option<String>,
        /// The enrollment group's id.
        #[arg(long, value_name = "ID")]
        enrollment_group_id: Option<String>,
    },
}

/// `zerotouch devices …`.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Print a device identity (credentials included) as JSON.
    #[command(after_help = STORE_EXIT_CODES)]
    Get {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Only look in this hub.
        #[arg(long, value_name = "NAME")]
        hub: Option<String>,
        /// The device id.
        device_id: String,
    },
    /// Print the device identities of every hub (or one) as a JSON array, symmetric keys left
    /// out (null) unless asked for.
    #[command(after_help = STORE_EXIT_CODES)]
    List {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Only list this hub.
        #[arg(long, value_name = "NAME")]
        hub: Option<String>,
        /// Include the devices' symmetric keys (their hub credentials; for an individual
        /// enrollment, the enrollment's own key).
        #[arg(long)]
        with_keys: bool,
    },
}

/// `zerotouch twins …`.
#[derive(Debug, Subcommand)]
pub enum TwinsCommand {
    /// Print a device twin (or a module twin) as JSON, as the IoT Hub service API returns it
    /// (`GET /twins/{id}`): tags, desired and reported properties with `$version` and
    /// `$metadata`, and the identity's fields (`status`, `deviceEtag`, `capabilities`, …).
    #[command(after_help = STORE_EXIT_CODES)]
    Get {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Only look in this hub.
        #[arg(long, value_name = "NAME")]
        hub: Option<String>,
        /// The twin of this module of the device instead.
        #[arg(long, value_name = "ID")]
        module: Option<String>,
        /// The device id.
        device_id: String,
    },
    /// Print the device twins of every hub (or one) as a JSON array of `{"hub": …, "twin": …}`,
    /// in device id order: what the query `SELECT * FROM devices` returns.
    #[command(after_help = STORE_EXIT_CODES)]
    List {
        /// The store.
        #[command(flatten)]
        store: StoreArgs,
        /// Only list this hub.
        #[arg(long, value_name = "NAME")]
        hub: Option<String>,
    },
}

/// `zerotouch device …`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register with a provisioning service and print the registration result as JSON.
    #[command(
        after_help = "Exit codes: 0 assigned; 2 usage; 3 invalid configuration or input; 4 ID scope not \
                      found, or no enrollment for a symmetric-key id where no symmetric-key group could \
                      cover it (an unenrolled device is otherwise refused, 5, as DPS cannot tell it from \
                      a wrong key or certificate); 5 refused (credential, failed or disabled \
                      registration); 6 throttled, timed out or no connection (try again later); 7 \
                      answers not understood; 1 anything else."
    )]
    Register(RegisterArgs),
}

/// Device protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// MQTT over TLS (port 8883).
    Mqtt,
    /// MQTT over WebSockets over TLS (port 443).
    MqttWs,
    /// HTTPS (port 443).
    Https,
}

/// `zerotouch device register`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("credential").args(["symmetric_key", "group_key", "cert"])))]
pub struct RegisterArgs {
    /// Provisioning service host, with a port when not the protocol's default.
    #[arg(long, value_name = "HOST[:PORT]", default_value = "global.azure-devices-provisioning.net")]
    pub provisioning_host: String,
    /// ID scope of the service.
    #[arg(long, value_name = "SCOPE")]
    pub id_scope: String,
    /// Registration id of this device.
    #[arg(long, value_name = "ID")]
    pub registration_id: String,
    /// The device's own symmetric key (base64), individual enrollment. Without any credential
    /// flag, `ZEROTOUCH_SYMMETRIC_KEY` is read instead (out of sight of other users' `ps`).
    #[arg(long, value_name = "BASE64")]
    pub symmetric_key: Option<String>,
    /// The enrollment group's key (base64): the device key is derived from it. Without any
    /// credential flag, `ZEROTOUCH_GROUP_KEY` is read instead.
    #[arg(long, value_name = "BASE64")]
    pub group_key: Option<String>,
    /// The device certificate chain (PEM, leaf first).
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The device certificate's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "cert", conflicts_with_all = ["symmetric_key", "group_key"])]
    pub key: Option<PathBuf>,
    /// Protocol.
    #[arg(long, value_enum, default_value_t = Transport::Mqtt)]
    pub transport: Transport,
    /// PEM CA certificate(s) to trust instead of the system roots (self-hosted servers).
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// Custom JSON payload sent with the registration.
    #[arg(long, value_name = "JSON")]
    pub payload: Option<String>,
    /// Give up when the registration has no outcome after this many seconds (a service that
    /// keeps answering `assigning` or throttling).
    #[arg(long, value_name = "SECS", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..))]
    pub registration_timeout: u64,
}

/// Runs an enrollments command on `backend`; returns what to print.
///
/// # Errors
/// [`ServerError::Import`] for an invalid entry of an import file, [`ServerError::Config`] for an
/// import file that cannot be read or is not a JSON array; store failures.
pub fn enrollments<B: Backend>(backend: &B, command: &EnrollmentsCommand) -> Result<Value, ServerError> {
    collected(|element| run_enrollments(backend, command, element))
}

/// The output of a command run by `run` as one value: a listing's elements gathered into an
/// array.
fn collected(
    run: impl FnOnce(&mut dyn FnMut(Value) -> Result<(), ServerError>) -> Result<Option<Value>, ServerError>,
) -> Result<Value, ServerError> {
    let mut listing = Vec::new();
    let whole = run(&mut |entry| {
        listing.push(entry);
        Ok(())
    })?;
    Ok(whole.unwrap_or(Value::Array(listing)))
}

/// [`enrollments`], with a listing's entries handed to `element` one by one (then `None`).
fn run_enrollments<B: Backend>(
    backend: &B,
    command: &EnrollmentsCommand,
    element: &mut dyn FnMut(Value) -> Result<(), ServerError>,
) -> Result<Option<Value>, ServerError> {
    match command {
        EnrollmentsCommand::Import { file, .. } => {
            let text = read_import(file)?;
            let file = admin::ImportFile::parse(&text)?;
            check_import(&file, &backend.hub_names()?)?;
            import_checked(backend, &file, element)
        }
        EnrollmentsCommand::List { with_keys, .. } => {
            let store = backend.provisioning()?;
            admin::for_each_enrollment(&store, *with_keys, element)?;
            Ok(None)
        }
        EnrollmentsCommand::Delete { registration_id, enrollment_group_id, .. } => {
            let store = backend.provisioning()?;
            admin::delete_enrollment(&store, registration_id.as_deref(), enrollment_group_id.as_deref())
                .map(Some)
        }
    }
}

/// The text of an import file. A file that cannot be read is bad input (exit code 3), as a
/// malformed one is: a script tells "my file is wrong" from a failing store by one code.
fn read_import(file: &std::path::Path) -> Result<String, ServerError> {
    let bytes = std::fs::read(file)
        .map_err(|e| ServerError::Config(format!("the import file {}: {e}", file.display())))?;
    admin::import_text(bytes)
}

/// Checks every entry of an import file (the first bad one is the error) and reports the
/// warnings; `hubs` are the hubs the store links (none for a store not made yet).
fn check_import(file: &admin::ImportFile<'_>, hubs: &[String]) -> Result<(), ServerError> {
    let (crypto, now) = (RingCrypto::new(), zerotouch_transport::service::now());
    for warning in admin::check_import(file, &crypto, now, hubs)? {
        crate::logging::report(&warning, false);
    }
    Ok(())
}

/// Imports a file [`check_import`] accepted into `backend`'s store, all or nothing.
fn import_checked<B: Backend>(
    backend: &B,
    file: &admin::ImportFile<'_>,
    _element: &mut dyn FnMut(Value) -> Result<(), ServerError>,
) -> Result<Option<Value>, ServerError> {
    let store = backend.provisioning()?;
    let (crypto, now) = (RingCrypto::new(), zerotouch_transport::service::now());
    let summary = admin::import_file(&store, &crypto, now, file)?;
    Ok(Some(json!({ "imported": summary })))
}

/// Runs a devices command on `backend`; returns what to print.
///
/// # Errors
/// [`ServerError::NotFound`] for a hub or device that is not there, [`ServerError::Config`] for a
/// malformed device id; store failures.
pub fn devices<B: Backend>(backend: &B, command: &DevicesCommand) -> Result<Value, ServerError> {
    collected(|element| run_devices(backend, command, element))
}

/// [`devices`], with a listing's entries handed to `element` one by one (then `None`).
fn run_devices<B: Backend>(
    backend: &B,
    command: &DevicesCommand,
    element: &mut dyn FnMut(Value) -> Result<(), ServerError>,
) -> Result<Option<Value>, ServerError> {
    let (hub, wanted, with_keys) = match command {
        DevicesCommand::Get { hub, device_id, .. } => (hub, Some(device_id), true),
        DevicesCommand::List { hub, with_keys, .. } => (hub, None, *with_keys),
    };
    let names = hubs_named(backend, hub.as_deref())?;
    match wanted {
        Some(id) => {
            let id = device_id(id)?;
            for name in &names {
                if let Some(device) = admin::device(&backend.hub(name)?.identities, &id)? {
                    return device_json(&device).map(Some);
                }
            }
            Err(ServerError::NotFound(match hub {
                Some(h) => format!("device {id} is not in hub {h}"),
                None => format!("device {id} is in no embedded hub"),
            }))
        }
        None => {
            for name in &names {
                admin::for_each_device(&backend.hub(name)?.identities, &mut |device| {
                    let mut identity = device_json(&device)?;
                    if !with_keys {
                        without_keys(&mut identity);
                    }
                    element(json!({ "hub": name, "identity": identity }))
                })?;
            }
            Ok(None)
        }
    }
}

/// The hubs a command looks in: `hub` (which must exist), or all of them.
fn hubs_named<B: Backend>(backend: &B, hub: Option<&str>) -> Result<Vec<String>, ServerError> {
    let names = backend.hub_names()?;
    match hub {
        // Host names compare without case; listings name the hub as stored.
        Some(h) => match names.into_iter().find(|n| n.eq_ignore_ascii_case(h)) {
            Some(stored) => Ok(vec![stored]),
            None => Err(ServerError::NotFound(format!("no embedded hub {h:?} in this store"))),
        },
        None => Ok(names),
    }
}

fn device_id(id: &str) -> Result<DeviceId, ServerError> {
    DeviceId::new(id).map_err(|e| ServerError::Config(format!("device id: {e}")))
}

/// Runs a twins command on `backend`; returns what to print.
///
/// # Errors
/// [`ServerError::NotFound`] for a hub, device or module that is not there,
/// [`ServerError::Config`] for a malformed device or module id; store failures.
pub fn twins<B: Backend>(backend: &B, command: &TwinsCommand) -> Result<Value, ServerError> {
    collected(|element| run_twins(backend, command, element))
}

/// [`twins`], with a listing's entries handed to `element` one by one (then `None`).
fn run_twins<B: Backend>(
    backend: &B,
    command: &TwinsCommand,
    element: &mut dyn FnMut(Value) -> Result<(), ServerError>,
) -> Result<Option<Value>, ServerError> {
    match command {
        TwinsCommand::Get { hub, module, device_id: id, .. } => {
            let id = device_id(id)?;
            let module = module
                .as_deref()
                .map(ModuleId::new)
                .transpose()
                .map_err(|e| ServerError::Config(format!("module id: {e}")))?;
            for name in &hubs_named(backend, hub.as_deref())? {
                let stores = backend.hub(name)?;
                if admin::device(&stores.identities, &id)?.is_none() {
                    continue;
                }
                return match admin::twin(&stores.identities, &stores.twins, &id, module.as_ref())? {
                    Some(twin) => Ok(Some(twin)),
                    None => Err(ServerError::NotFound(format!(
                        "device {id} in hub {name} has no module {}",
                        module.as_ref().map_or("", |m| m.as_str())
                    ))),
                };
            }
            Err(ServerError::NotFound(match hub {
                Some(h) => format!("device {id} is not in hub {h}"),
                None => format!("device {id} is in no embedded hub"),
            }))
        }
        TwinsCommand::List { hub, .. } => {
            for name in &hubs_named(backend, hub.as_deref())? {
                backend
                    .for_each_device_twin(name, &mut |twin| element(json!({ "hub": name, "twin": twin })))?;
            }
            Ok(None)
        }
    }
}

/// Nulls an identity's symmetric keys, keeping the JSON's shape (as for a certificate device).
fn without_keys(identity: &mut Value) {
    if let Some(Value::Object(keys)) = identity.pointer_mut("/authentication/symmetricKey") {
        for key in keys.values_mut() {
            *key = Value::Null;
        }
    }
}

fn device_json(device: &zerotouch_proto::hub::Device) -> Result<Value, ServerError> {
    serde_json::to_value(device).map_err(|e| ServerError::Store(e.to_string()))
}

/// Runs a parsed command line: what `main` does.
///
/// # Errors
/// Whatever the command failed with; `main` prints it and exits non-zero.
pub fn run(cli: Cli) -> Result<(), ServerError> {
    match cli.command {
        Command::Serve(args) => {
            let runtime = runtime()?;
            let served = runtime.block_on(serve(args));
            // Dropping a runtime waits for every blocking task; an engine call stuck in a store
            // (answered 500 long ago) would hold the process after its graceful stop for ever.
            runtime.shutdown_timeout(std::time::Duration::from_secs(5));
            served
        }
        Command::Enrollments(command) => {
            // A listing reads a store that exists, read-only, so that it works on a backup or a
            // read-only mount and changes nothing there.
            let (location, read_only) = match &command {
                EnrollmentsCommand::Import { store, file, .. } => return import_command(store, file),
                EnrollmentsCommand::List { store, .. } => (store.existing_location()?, true),
                EnrollmentsCommand::Delete { store, .. } => (store.existing_location()?, false),
            };
            printed!(location, read_only: read_only, run_enrollments(&command))
        }
        Command::Devices(command) => {
            // Every devices command only reads.
            let store = match &command {
                DevicesCommand::Get { store, .. } | DevicesCommand::List { store, .. } => store,
            };
            printed!(store.existing_location()?, read_only: true, run_devices(&command))
        }
        Command::Twins(command) => {
            let store = match &command {
                TwinsCommand::Get { store, .. } | TwinsCommand::List { store, .. } => store,
            };
            // Every twins command only reads.
            printed!(store.existing_location()?, read_only: true, run_twins(&command))
        }
        Command::Device(DeviceCommand::Register(args)) => print(&runtime()?.block_on(register(&args))?),
    }
}

/// `enrollments import`: the store may be created (enrollments before the first `serve`), but
/// only for a file that was read and checked.
fn import_command(store: &StoreArgs, file: &std::path::Path) -> Result<(), ServerError> {
    // An import may create the store (enrollments before the first `serve`), but only
    // for a file it has read and checked: a missing or malformed one (at a mistyped
    // --data-dir, or with a URL naming another database) creates and migrates nothing.
    let text = read_import(file)?;
    let parsed = admin::ImportFile::parse(&text)?;
    // The hubs the store links, for the warnings, read without writing; a store not
    // made yet (or one that cannot be read so) links none that could be named.
    let hubs = match store.existing_location() {
        Ok(existing) => (|| on_backend!(existing, read_only: true, |b| b.hub_names()))().unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    check_import(&parsed, &hubs)?;
    printed!(store.location()?, read_only: false, import_checked(&parsed))
}

fn runtime() -> Result<tokio::runtime::Runtime, ServerError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ServerError::io("tokio runtime", e))
}

/// A command's JSON output: one value, or a listing written element by element exactly as
/// `serde_json::to_string_pretty` writes the whole array, so that a listing of a million
/// entries never exists as one value. A reader that stops early (`| head`) ends the output
/// quietly: what it wanted was written.
struct JsonOut<W: std::io::Write> {
    out: W,
    elements: usize,
    closed: bool,
}

impl<W: std::io::Write> JsonOut<W> {
    fn new(out: W) -> Self {
        Self { out, elements: 0, closed: false }
    }

    fn write(&mut self, text: &str) -> Result<(), ServerError> {
        if self.closed {
            return Ok(());
        }
        match self.out.write_all(text.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other.map_err(|e| ServerError::io("standard output", e)),
        }
    }

    /// Writes the next element of the listing. Once the reader has gone, fails with
    /// [`reader_gone`]'s error, which ends the walk over the store (see [`JsonOut::end`]).
    fn element(&mut self, value: &Value) -> Result<(), ServerError> {
        if self.closed {
            return Err(reader_gone());
        }
        let text = serde_json::to_string_pretty(value).map_err(|e| ServerError::Store(e.to_string()))?;
        let mut chunk = String::with_capacity(text.len() + text.len() / 8 + 4);
        chunk.push_str(if self.elements == 0 { "[\n" } else { ",\n" });
        for (n, line) in text.lines().enumerate() {
            if n > 0 {
                chunk.push('\n');
            }
            chunk.push_str("  ");
            chunk.push_str(line);
        }
        self.elements += 1;
        self.write(&chunk)
    }

    /// Ends the output of a command that returned `result`: a walk ended because the reader
    /// went away is a success (it had what it wanted); another error leaves the listing
    /// unfinished (the exit code and the message on stderr say so).
    fn end(self, result: Result<Option<Value>, ServerError>) -> Result<(), ServerError> {
        match result {
            Ok(whole) => self.finish(whole.as_ref()),
            Err(ServerError::Io { source, .. })
                if self.closed && source.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Writes `whole` when the command had one value to say, else closes the listing.
    fn finish(mut self, whole: Option<&Value>) -> Result<(), ServerError> {
        match whole {
            Some(value) => {
                let text =
                    serde_json::to_string_pretty(value).map_err(|e| ServerError::Store(e.to_string()))?;
                self.write(&text)?;
                self.write("\n")?;
            }
            None if self.elements == 0 => self.write("[]\n")?,
            None => self.write("\n]\n")?,
        }
        if self.closed {
            return Ok(());
        }
        match self.out.flush() {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                Err(ServerError::io("standard output", e))
            }
            _ => Ok(()),
        }
    }
}

/// The error a listing's walk ends with once standard output's reader has gone.
fn reader_gone() -> ServerError {
    ServerError::io("standard output", std::io::Error::from(std::io::ErrorKind::BrokenPipe))
}

/// Prints `value` as pretty JSON on stdout. A reader that stops early (`| head`) is not an
/// error: the output it wanted was written.
fn print(value: &Value) -> Result<(), ServerError> {
    use std::io::Write as _;
    let text = serde_json::to_string_pretty(value).map_err(|e| ServerError::Store(e.to_string()))?;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(ServerError::io("standard output", e)),
        _ => Ok(()),
    }
}

/// `zerotouch serve`: starts the server and runs it until SIGINT or SIGTERM.
///
/// # Errors
/// Configuration, start-up and signal-handler failures.
pub async fn serve(mut args: ServeArgs) -> Result<(), ServerError> {
    args.read_config();
    let file = args.read.take().map_or_else(|| Ok(Settings::default()), |read| *read)?;
    let config = args.settings.or(file).resolve()?;
    match config.store.database_url.clone() {
        None => {
            let backend = crate::backend::SqliteBackend::new(&config.store.data_dir)
                .with_durability(config.sqlite_durability);
            serve_on(&config, backend).await
        }
        Some(url) => {
            // The PostgreSQL client blocks (it drives its own runtime).
            let backend =
                tokio::task::spawn_blocking(move || crate::backend::PgBackend::connect(url.as_str()))
                    .await
                    .map_err(|e| ServerError::Store(e.to_string()))??;
            serve_on(&config, backend).await
        }
    }
}

async fn serve_on<B: Backend>(config: &crate::config::ServeConfig, backend: B) -> Result<(), ServerError> {
    // Registered before anything is printed, so a supervisor that signals as soon as it sees
    // the endpoints still gets a graceful stop.
    let stop = ShutdownSignal::register()?;
    let handle = crate::server::start(config, backend).await?;
    let mut banner = format!(
        "zerotouch serving id scope {}\n  MQTT/TLS          {}\n  HTTPS, MQTT/WS    {}\n",
        handle.id_scope(),
        handle.mqtt_addr(),
        handle.https_addr()
    );
    for hub in &config.hubs {
        banner.push_str(&format!("  embedded hub      {} (weight {})\n", hub.name, hub.weight));
    }
    match handle.ca_cert() {
        Some(ca) => banner.push_str(&format!(
            "  development CA    {}\n  TLS certificate   {}\n",
            ca.display(),
            handle.tls_files().cert.display()
        )),
        None => banner.push_str(&format!("  certificate       {}\n", handle.tls_files().cert.display())),
    }
    banner.push_str(&format!("  data              {}\n", config.store.data_dir.display()));
    // A closed standard output (`serve | head -1`, a supervisor that closed it) costs the
    // banner, not the server.
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(banner.as_bytes()).and_then(|()| out.flush()) {
            tracing::debug!(error = %e, "the start-up banner could not be written to standard output");
        }
    }
    stop.recv().await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

/// SIGINT or SIGTERM.
struct ShutdownSignal {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignal {
    fn register() -> Result<Self, ServerError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let signal_err = |e| ServerError::io("signal handler", e);
            Ok(Self {
                interrupt: signal(SignalKind::interrupt()).map_err(signal_err)?,
                terminate: signal(SignalKind::terminate()).map_err(signal_err)?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = &mut self;
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The credential `device register` proves itself with.
#[derive(Debug, PartialEq, Eq)]
enum DeviceCredential {
    SymmetricKey(String),
    GroupKey(String),
    X509 { cert: PathBuf, key: PathBuf },
}

/// The credential of the flags, else of the key variables in `env` (one of them).
fn device_credential(
    args: &RegisterArgs,
    env: impl Fn(&str) -> Option<String>,
) -> Result<DeviceCredential, ServerError> {
    if let Some(key) = &args.symmetric_key {
        return Ok(DeviceCredential::SymmetricKey(key.clone()));
    }
    if let Some(key) = &args.group_key {
        return Ok(DeviceCredential::GroupKey(key.clone()));
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        return Ok(DeviceCredential::X509 { cert: cert.clone(), key: key.clone() });
    }
    match (env("ZEROTOUCH_SYMMETRIC_KEY"), env("ZEROTOUCH_GROUP_KEY")) {
        (Some(key), None) => Ok(DeviceCredential::SymmetricKey(key)),
        (None, Some(key)) => Ok(DeviceCredential::GroupKey(key)),
        (Some(_), Some(_)) => Err(ServerError::Config(
            "both ZEROTOUCH_SYMMETRIC_KEY and ZEROTOUCH_GROUP_KEY are set: unset one, or give a flag".into(),
        )),
        (None, None) => Err(ServerError::Config(
            "no credential: give --symmetric-key, --group-key or --cert with --key (or set \
             ZEROTOUCH_SYMMETRIC_KEY or ZEROTOUCH_GROUP_KEY)"
                .into(),
        )),
    }
}

/// The content of the file a flag names; an error names the flag and the file.
fn read_flag_file(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|e| ServerError::Config(format!("{flag} {}: {e}", path.display())))
}

/// Whether `pem` holds a block with one of `labels`.
fn has_pem(pem: &[u8], labels: &[&str]) -> bool {
    let text = String::from_utf8_lossy(pem);
    labels.iter().any(|label| text.contains(&format!("-----BEGIN {label}-----")))
}

/// Checks that the file given with `flag` holds a PEM block with one of `labels` (`what` names
/// it for the error): a certificate and key swapped, or a file of the wrong kind, is told by flag
/// and file rather than by the TLS library's "no items found".
fn check_pem(
    flag: &str,
    path: &std::path::Path,
    pem: &[u8],
    labels: &[&str],
    what: &str,
) -> Result<(), ServerError> {
    if has_pem(pem, labels) {
        Ok(())
    } else {
        Err(ServerError::Config(format!("{flag} {}: holds no PEM {what}", path.display())))
    }
}

/// `zerotouch device register`: registers with our client and returns the registration state.
///
/// # Errors
/// [`ServerError::Registration`] with the service's status and error code when it refuses;
/// unreadable certificate files; an invalid payload.
pub async fn register(args: &RegisterArgs) -> Result<Value, ServerError> {
    use zerotouch_transport::client::{ClientError, ProvisioningClient, Transport as ClientTransport};

    let transport = match args.transport {
        Transport::Mqtt => ClientTransport::Mqtt,
        Transport::MqttWs => ClientTransport::MqttWs,
        Transport::Https => ClientTransport::Https,
    };
    let mut builder = ProvisioningClient::builder(&args.id_scope, &args.registration_id)
        .provisioning_host(&args.provisioning_host)
        .transport(transport)
        .registration_timeout(std::time::Duration::from_secs(args.registration_timeout));
    builder = match device_credential(args, |name| std::env::var(name).ok())? {
        DeviceCredential::SymmetricKey(key) => builder.symmetric_key(key.as_str()),
        DeviceCredential::GroupKey(key) => builder.group_key(key.as_str()),
        DeviceCredential::X509 { cert, key } => {
            let (cert_pem, key_pem) = (read_flag_file("--cert", &cert)?, read_flag_file("--key", &key)?);
            check_pem("--cert", &cert, &cert_pem, &["CERTIFICATE"], "certificate")?;
            if has_pem(&key_pem, &["ENCRYPTED PRIVATE KEY"]) {
                return Err(ServerError::Config(format!(
                    "--key {}: the private key is encrypted; give it decrypted (openssl pkey -in KEY -out \
                     KEY.plain)",
                    key.display()
                )));
            }
            let keys = ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"];
            check_pem("--key", &key, &key_pem, &keys, "private key (PKCS#8, PKCS#1 or SEC1)")?;
            builder.x509_pem(cert_pem, key_pem)
        }
    };
    if let Some(ca) = &args.ca {
        // Read by the client, so that it names the file when it holds no certificate.
        builder = builder.ca_file(ca).map_err(|e| match e {
            ClientError::Config(message) => ServerError::Config(format!("--ca: {message}")),
            other => ServerError::Config(format!("--ca: {other}")),
        })?;
    }
    if let Some(payload) = &args.payload {
        let value =
            serde_json::from_str(payload).map_err(|e| ServerError::Config(format!("--payload: {e}")))?;
        builder = builder.payload(value);
    }
    let client = builder.build().map_err(registration_error)?;
    let assignment = client.register().await.map_err(registration_error)?;
    serde_json::to_value(&assignment.state).map_err(|e| ServerError::Registration {
        message: e.to_string(),
        kind: RegistrationErrorKind::Protocol,
    })
}

/// A client error as the error `device register` ends with, classed for its exit code.
fn registration_error(e: zerotouch_transport::client::ClientError) -> ServerError {
    use zerotouch_engine::registration::FailureKind;
    use zerotouch_transport::client::ClientError;
    let kind = match &e {
        ClientError::Config(message) => return ServerError::Config(message.clone()),
        // Waiting cures neither a host name that does not exist nor a certificate not trusted.
        ClientError::UnknownHost(_) => return ServerError::Config(format!("--provisioning-host: {e}")),
        ClientError::UntrustedServer(_) => RegistrationErrorKind::Refused,
        ClientError::Connection(_) | ClientError::ConnectRefused { return_code: 3, .. } => {
            RegistrationErrorKind::Retryable
        }
        ClientError::ConnectRefused { return_code: 4 | 5, .. } => RegistrationErrorKind::Refused,
        ClientError::Registration(failure) => match failure.kind {
            FailureKind::NotFound => RegistrationErrorKind::NotFound,
            FailureKind::Timeout | FailureKind::Throttled => RegistrationErrorKind::Retryable,
            FailureKind::Protocol => RegistrationErrorKind::Protocol,
            _ => RegistrationErrorKind::Refused,
        },
        _ => RegistrationErrorKind::Protocol,
    };
    ServerError::Registration { message: e.to_string(), kind }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser as _;

    use super::Cli;

    #[test]
    fn a_private_key_beside_a_symmetric_key_is_refused_not_ignored() {
        let base = [
            "zerotouch",
            "device",
            "register",
            "--provisioning-host",
            "localhost",
            "--id-scope",
            "0ne00000001",
        ];
        let with = |extra: &[&str]| {
            Cli::try_parse_from(base.iter().chain(["--registration-id", "d1"].iter()).chain(extra))
        };
        assert!(with(&["--symmetric-key", "a2V5", "--key", "k.pem"]).is_err());
        assert!(with(&["--group-key", "a2V5", "--key", "k.pem"]).is_err());
        assert!(with(&["--cert", "c.pem", "--key", "k.pem"]).is_ok());
        assert!(with(&["--symmetric-key", "a2V5"]).is_ok());
        assert!(with(&["--symmetric-key", "a2V5", "--registration-timeout", "60"]).is_ok());
        assert!(with(&["--symmetric-key", "a2V5", "--registration-timeout", "0"]).is_err());
    }

    fn register_args(extra: &[&str]) -> super::RegisterArgs {
        use super::{Command, DeviceCommand};
        let base =
            ["zerotouch", "device", "register", "--id-scope", "0ne00000001", "--registration-id", "d1"];
        match Cli::try_parse_from(base.iter().chain(extra)).unwrap().command {
            Command::Device(DeviceCommand::Register(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    /// The configuration error `device register` stops with before connecting.
    fn config_error(extra: &[&str]) -> String {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        match runtime.block_on(super::register(&register_args(extra))) {
            Err(e @ super::ServerError::Config(_)) => e.to_string(),
            other => panic!("{extra:?}: {other:?}"),
        }
    }

    /// Review diff13 #9: an untrusted server certificate and a host that does not resolve
    /// exited 6 ("try again later"), so scripts retried them for ever.
    #[test]
    fn client_errors_that_waiting_does_not_cure_are_not_try_again_later() {
        use zerotouch_engine::registration::{FailureKind, RegistrationFailure};
        use zerotouch_transport::client::ClientError;

        let code = |e: ClientError| super::registration_error(e).exit_code();
        let untrusted =
            ClientError::UntrustedServer("localhost:8883: invalid peer certificate: UnknownIssuer".into());
        assert_eq!(code(untrusted), 5, "refused: the certificate is not trusted");
        let unknown = ClientError::UnknownHost(
            "nosuch.example:8883: failed to lookup address information: Name or service not known".into(),
        );
        let e = super::registration_error(unknown);
        assert_eq!(e.exit_code(), 3, "configuration: the host does not exist");
        assert!(e.to_string().starts_with("configuration: --provisioning-host: "), "{e}");
        assert!(e.to_string().contains("nosuch.example:8883"), "{e}");
        // What waiting may cure stays 6.
        assert_eq!(code(ClientError::Connection("127.0.0.1:8883: connection refused".into())), 6);
        assert_eq!(code(ClientError::ConnectRefused { return_code: 3, reason: "server unavailable" }), 6);
        let timeout = RegistrationFailure {
            kind: FailureKind::Timeout,
            status: None,
            error_code: None,
            message: "no outcome within 900 s (the registration timeout)".into(),
        };
        assert_eq!(code(ClientError::Registration(timeout)), 6);
        assert_eq!(code(ClientError::ConnectRefused { return_code: 5, reason: "not authorized" }), 5);
    }

    /// Review diff13 #9, end to end: a provisioning host that does not resolve is a
    /// configuration error naming the flag.
    #[test]
    fn a_provisioning_host_that_does_not_resolve_is_a_configuration_error() {
        // `.invalid` never resolves (RFC 6761); an unreachable name service answers a temporary
        // failure instead, which is "try again later", and there is nothing to check.
        if let Err(e) = std::net::ToSocketAddrs::to_socket_addrs("zerotouch-test.invalid:443") {
            if e.to_string().to_ascii_lowercase().contains("temporary failure") {
                eprintln!("skipped: the name service is unreachable here ({e})");
                return;
            }
        }
        let message = config_error(&[
            "--symmetric-key",
            "a2V5",
            "--provisioning-host",
            "zerotouch-test.invalid:18883",
            "--registration-timeout",
            "5",
        ]);
        assert!(message.starts_with("configuration: --provisioning-host: "), "{message}");
        assert!(message.contains("zerotouch-test.invalid:18883"), "{message}");
    }

    /// Device review D8: the engine's "bad request:" prefix leaked into the CLI's configuration
    /// errors.
    #[test]
    fn a_bad_symmetric_key_is_a_plain_configuration_error() {
        assert_eq!(
            config_error(&["--symmetric-key", "no!"]),
            "configuration: the symmetric key is not valid base64"
        );
        assert_eq!(config_error(&["--group-key", "no!"]), "configuration: the group key is not valid base64");
    }

    /// Device review D8 and operator review #13: a missing file said only its path, and a `--ca`
    /// file without a certificate did not say which file.
    #[test]
    fn a_missing_or_empty_credential_or_ca_file_names_its_flag_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nonexist.pem");
        let missing = missing.to_str().unwrap();
        let json = dir.path().join("en.json");
        std::fs::write(&json, "{}").unwrap();
        let json = json.to_str().unwrap();
        let cert = config_error(&["--cert", missing, "--key", json]);
        assert!(cert.starts_with(&format!("configuration: --cert {missing}: ")), "{cert}");
        let key = config_error(&["--cert", json, "--key", missing]);
        assert!(key.starts_with(&format!("configuration: --key {missing}: ")), "{key}");
        let ca = config_error(&["--symmetric-key", "a2V5", "--ca", missing]);
        assert!(ca.starts_with("configuration: --ca: ") && ca.contains(missing), "{ca}");
        let ca = config_error(&["--symmetric-key", "a2V5", "--ca", json]);
        assert_eq!(ca, format!("configuration: the CA file {json} holds no PEM certificate"));
    }

    #[test]
    fn a_key_in_the_environment_is_used_only_when_no_credential_flag_is_given() {
        use std::path::PathBuf;

        use super::{device_credential, Command, DeviceCommand, DeviceCredential};
        let args = |extra: &[&str]| {
            let base =
                ["zerotouch", "device", "register", "--id-scope", "0ne00000001", "--registration-id", "d1"];
            let cli = Cli::try_parse_from(base.iter().chain(extra)).unwrap();
            match cli.command {
                Command::Device(DeviceCommand::Register(a)) => a,
                other => panic!("{other:?}"),
            }
        };
        let group_env = |name: &str| (name == "ZEROTOUCH_GROUP_KEY").then(|| "Z3JvdXA=".to_owned());
        let x509 = args(&["--cert", "c.pem", "--key", "k.pem"]);
        assert_eq!(
            device_credential(&x509, group_env).unwrap(),
            DeviceCredential::X509 { cert: PathBuf::from("c.pem"), key: PathBuf::from("k.pem") }
        );
        let bare = args(&[]);
        assert_eq!(
            device_credential(&bare, group_env).unwrap(),
            DeviceCredential::GroupKey("Z3JvdXA=".into())
        );
        let both = |_: &str| Some("a2V5".to_owned());
        assert!(device_credential(&bare, both).unwrap_err().to_string().contains("both"));
        assert!(device_credential(&bare, |_| None).unwrap_err().to_string().contains("no credential"));
    }
}

#[cfg(test)]
mod json_out_tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::{json, Value};

    use super::JsonOut;

    fn streamed(elements: &[Value]) -> String {
        let mut bytes = Vec::new();
        let mut out = JsonOut::new(&mut bytes);
        for element in elements {
            out.element(element).unwrap();
        }
        out.finish(None).unwrap();
        String::from_utf8(bytes).unwrap()
    }

    /// A reader that takes `left` bytes, then is gone.
    struct Closing {
        left: usize,
    }

    impl std::io::Write for Closing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_listing_stops_walking_once_its_reader_is_gone_and_ends_quietly() {
        let mut out = JsonOut::new(Closing { left: 10 });
        let mut visited = 0;
        let result = (|| -> Result<Option<Value>, crate::error::ServerError> {
            for n in 0..1000 {
                visited += 1;
                out.element(&json!({ "n": n }))?;
            }
            Ok(None)
        })();
        assert!(visited < 5, "the walk went on after the reader left: {visited}");
        out.end(result).unwrap();
    }

    #[test]
    fn a_streamed_listing_is_the_pretty_json_of_the_whole_array() {
        let elements = [
            json!({"registrationId": "a", "attestation": {"type": "symmetricKey", "x": [1, 2, {"y": null}]}}),
            json!({"enrollmentGroupId": "g", "text": "line\nbreak", "empty": {}, "list": []}),
            json!("plain"),
        ];
        for n in 0..=elements.len() {
            let whole = serde_json::to_string_pretty(&Value::Array(elements[..n].to_vec())).unwrap() + "\n";
            assert_eq!(streamed(&elements[..n]), whole, "{n} elements");
        }
    }
}
