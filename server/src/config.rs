//! Settings of `zerotouch serve`: flags, the TOML `--config` file with the same keys, defaults.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zerotouch_engine::hub::LinkedHub;
use zerotouch_proto::IdScope;

use crate::error::ServerError;

/// Data directory used when neither `--data-dir` nor the config file names one.
pub const DEFAULT_DATA_DIR: &str = "zerotouch-data";
/// MQTT (DPS device API over MQTT/TLS) listen address by default.
pub const DEFAULT_MQTT_LISTEN: &str = "127.0.0.1:8883";
/// HTTPS (DPS device API and MQTT over WebSockets) listen address by default.
pub const DEFAULT_HTTPS_LISTEN: &str = "127.0.0.1:8443";
/// `retry-after` seconds sent with every `assigning` reply by default, as Azure DPS does.
pub const DEFAULT_RETRY_AFTER_SECS: u32 = 3;

/// Open device connections at most when `--max-connections` is not given.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The `retry-after` values accepted: the C SDK treats anything outside 1–300 s as 1 s.
pub const RETRY_AFTER_RANGE: std::ops::RangeInclusive<u32> = 1..=300;

/// Host name of the one embedded hub when no `--hub` is given. `localhost` because the
/// development server certificate covers it and it resolves everywhere without DNS set-up.
pub const DEFAULT_HUB: &str = "localhost";

/// The settings as given: every field optional, so flags can override the config file.
/// The config file uses the flag names as keys (`data-dir = "…"`, `hub = ["a:1", "b:2"]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Directory of the SQLite database, the ID scope and the development certificates
    /// (default ./zerotouch-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// ID scope devices must name; written to the data directory's `id-scope`, and later starts
    /// without the flag use it (generated on first start when not given).
    #[arg(long, value_name = "SCOPE")]
    pub id_scope: Option<String>,
    /// PEM server certificate chain (otherwise a development CA and certificate are generated).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Address of the MQTT/TLS listener (default 127.0.0.1:8883; port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub mqtt_listen: Option<SocketAddr>,
    /// Address of the HTTPS listener, also serving MQTT over WebSockets (default 127.0.0.1:8443).
    #[arg(long, value_name = "ADDR")]
    pub https_listen: Option<SocketAddr>,
    /// An embedded hub `NAME[:WEIGHT]` devices are allocated to; repeat for several (default
    /// one hub, `localhost`).
    #[arg(long = "hub", value_name = "NAME[:WEIGHT]")]
    #[serde(default)]
    pub hub: Vec<String>,
    /// PostgreSQL URL (`postgres://…`) instead of the SQLite database in the data directory;
    /// also read from `ZEROTOUCH_DATABASE_URL`, out of sight of `ps` (plain TCP: no TLS to the
    /// database).
    #[arg(long, value_name = "URL", env = "ZEROTOUCH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,
    /// Seconds devices are told to wait before polling an `assigning` registration (1 to 300;
    /// default 3 like Azure DPS). Smaller values make registrations finish sooner.
    #[arg(long, value_name = "SECS")]
    pub retry_after: Option<u32>,
    /// Open device connections at most, MQTT and HTTPS together (default 10 000); further
    /// connections are closed as soon as they are accepted. Keep it below the process's file
    /// descriptor limit (`ulimit -n`).
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// What a committed registration survives with the SQLite store: `process-crash` (the
    /// default: the process killed; a power loss may roll back the last commits) or `power-loss`
    /// (every commit synced to disk: ~5–7 % fewer registrations per second). PostgreSQL's is
    /// the database server's `synchronous_commit`.
    #[arg(long, value_name = "WHAT", value_enum)]
    pub sqlite_durability: Option<SqliteDurability>,
    /// Log line format, `text` or `json`: a key of the config file only, since the flag,
    /// `--log-format`, is global to every command (it wins over the file). Logging starts
    /// before the command runs: see [`crate::cli::Cli::initial_log_format`].
    #[arg(skip)]
    pub log_format: Option<crate::cli::LogFormat>,
}

/// What a commit of the SQLite store survives (`--sqlite-durability`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SqliteDurability {
    /// The process being killed or crashing (SQLite `synchronous=NORMAL` in WAL mode).
    #[default]
    ProcessCrash,
    /// A power loss or an operating-system crash too (`synchronous=FULL`).
    PowerLoss,
}

impl Settings {
    /// Reads a TOML config file.
    ///
    /// # Errors
    /// [`ServerError::Io`] when unreadable, [`ServerError::Config`] for bad TOML or unknown keys.
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|e| ServerError::io(path, e))?;
        let mut settings = Self::from_toml(&text).map_err(|e| match e {
            ServerError::Config(m) => ServerError::Config(format!("{}: {m}", path.display())),
            other => other,
        })?;
        // Relative paths in a file mean the file's folder (as in most tools' config files), so
        // the file works from any working directory.
        let folder = path.parent().unwrap_or(Path::new(""));
        for p in [&mut settings.data_dir, &mut settings.tls_cert, &mut settings.tls_key].into_iter().flatten()
        {
            if p.is_relative() {
                *p = folder.join(&*p);
            }
        }
        Ok(settings)
    }

    /// Parses TOML config text.
    ///
    /// # Errors
    /// [`ServerError::Config`] for bad TOML, bad values or unknown keys.
    pub fn from_toml(text: &str) -> Result<Self, ServerError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            // Not the error's own text: it quotes the offending line, which may be the
            // database URL with its password.
            let line = e.span().map(|span| text.get(..span.start).unwrap_or(text).matches('\n').count() + 1);
            let at = line.map(|n| format!("line {n}: ")).unwrap_or_default();
            ServerError::Config(format!("{at}{}", without_quoted_values(e.message().trim_end())))
        })
    }

    /// These settings where set, `file` where not (flags win over the config file).
    pub fn or(self, file: Settings) -> Settings {
        let (tls_cert, tls_key) = if self.tls_cert.is_some() || self.tls_key.is_some() {
            (self.tls_cert, self.tls_key)
        } else {
            (file.tls_cert, file.tls_key)
        };
        Settings {
            data_dir: self.data_dir.or(file.data_dir),
            id_scope: self.id_scope.or(file.id_scope),
            // The certificate and its key come as a pair from one source.
            tls_cert,
            tls_key,
            mqtt_listen: self.mqtt_listen.or(file.mqtt_listen),
            https_listen: self.https_listen.or(file.https_listen),
            hub: if self.hub.is_empty() { file.hub } else { self.hub },
            database_url: self.database_url.or(file.database_url),
            retry_after: self.retry_after.or(file.retry_after),
            max_connections: self.max_connections.or(file.max_connections),
            sqlite_durability: self.sqlite_durability.or(file.sqlite_durability),
            log_format: self.log_format.or(file.log_format),
        }
    }

    /// Fills defaults and checks every value.
    ///
    /// # Errors
    /// [`ServerError::Config`] naming the bad setting.
    pub fn resolve(self) -> Result<ServeConfig, ServerError> {
        let id_scope = self
            .id_scope
            .map(|s| IdScope::new(&s).map_err(|e| ServerError::Config(format!("id-scope {s:?}: {e}"))))
            .transpose()?;
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => return Err(ServerError::Config("tls-cert and tls-key go together".into())),
        };
        let hubs = if self.hub.is_empty() {
            vec![HubSpec { name: DEFAULT_HUB.to_owned(), weight: 1 }]
        } else {
            self.hub.iter().map(|h| HubSpec::parse(h)).collect::<Result<Vec<_>, _>>()?
        };
        let mut seen = HashSet::new();
        for h in &hubs {
            if !seen.insert(h.name.to_ascii_lowercase()) {
                return Err(ServerError::Config(format!("hub {:?} is given twice", h.name)));
            }
        }
        let retry_after_secs = match self.retry_after {
            Some(secs) if !RETRY_AFTER_RANGE.contains(&secs) => {
                return Err(ServerError::Config(format!("retry-after {secs}: must be 1 to 300 seconds")));
            }
            Some(secs) => secs,
            None => DEFAULT_RETRY_AFTER_SECS,
        };
        let max_connections = match self.max_connections {
            Some(0) => return Err(ServerError::Config("max-connections 0: must be at least 1".into())),
            Some(n) => n,
            None => DEFAULT_MAX_CONNECTIONS,
        };
        if self.sqlite_durability.is_some() && self.database_url.is_some() {
            return Err(ServerError::Config(
                "sqlite-durability applies to the SQLite store; with database-url, PostgreSQL's \
                 synchronous_commit decides"
                    .into(),
            ));
        }
        let default_addr = |s: &str| s.parse::<SocketAddr>().map_err(|e| ServerError::Config(e.to_string()));
        Ok(ServeConfig {
            store: StoreLocation::new(self.data_dir, self.database_url),
            id_scope,
            tls,
            mqtt_listen: match self.mqtt_listen {
                Some(a) => a,
                None => default_addr(DEFAULT_MQTT_LISTEN)?,
            },
            https_listen: match self.https_listen {
                Some(a) => a,
                None => default_addr(DEFAULT_HTTPS_LISTEN)?,
            },
            hubs,
            retry_after_secs,
            max_connections,
            sqlite_durability: self.sqlite_durability.unwrap_or_default(),
        })
    }
}

/// Where the state lives: always a data directory (ID scope, certificates, SQLite database),
/// and optionally a PostgreSQL database that then holds the enrollments and registries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLocation {
    /// The data directory.
    pub data_dir: PathBuf,
    /// PostgreSQL URL; `None` means SQLite in the data directory.
    pub database_url: Option<DatabaseUrl>,
}

/// A PostgreSQL URL, which may hold a password: its `Debug` shows none of it, so that no
/// `{:?}` of a configuration ever logs it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL, password included.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl From<&str> for DatabaseUrl {
    fn from(url: &str) -> Self {
        Self(url.to_owned())
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

impl StoreLocation {
    /// `data_dir` (default [`DEFAULT_DATA_DIR`]) and an optional database URL.
    pub fn new(data_dir: Option<PathBuf>, database_url: Option<DatabaseUrl>) -> Self {
        Self { data_dir: data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)), database_url }
    }
}

/// A certificate chain and key given by the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// One embedded hub and its allocation weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    /// Host name devices are told to connect to (`assignedHub`).
    pub name: String,
    /// Weight under the weighted-distribution allocation policy (1 to 1000).
    pub weight: u32,
}

impl HubSpec {
    /// Parses `NAME[:WEIGHT]`.
    ///
    /// # Errors
    /// [`ServerError::Config`] for an empty or non-host name or a weight outside 1–1000.
    pub fn parse(s: &str) -> Result<Self, ServerError> {
        let (name, weight) = match s.rsplit_once(':') {
            Some((n, w)) => {
                let weight = w
                    .parse::<u32>()
                    .ok()
                    .filter(|w| (1..=1000).contains(w))
                    .ok_or_else(|| ServerError::Config(format!("hub {s:?}: weight must be 1 to 1000")))?;
                (n, weight)
            }
            None => (s, 1),
        };
        // A host name (RFC 1123): dot-separated labels of 1 to 63 letters, digits and inner
        // hyphens; devices are sent this name as their hub.
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(ServerError::Config(format!("hub {s:?}: the name must be a host name")));
        }
        Ok(Self { name: name.to_owned(), weight })
    }

    /// The linked hub the allocator sees.
    pub fn linked(&self) -> LinkedHub {
        LinkedHub::new(self.name.clone()).with_weight(self.weight)
    }
}

/// Resolved settings of `zerotouch serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Where the state lives.
    pub store: StoreLocation,
    /// The ID scope; `None` uses the one kept in the data directory (generated on first start).
    pub id_scope: Option<IdScope>,
    /// Operator certificate; `None` uses the development CA in the data directory.
    pub tls: Option<TlsFiles>,
    /// MQTT/TLS listen address.
    pub mqtt_listen: SocketAddr,
    /// HTTPS (+ MQTT over WebSockets) listen address.
    pub https_listen: SocketAddr,
    /// Embedded hubs, in the order given.
    pub hubs: Vec<HubSpec>,
    /// `retry-after` seconds of `assigning` replies.
    pub retry_after_secs: u32,
    /// Open device connections at most.
    pub max_connections: usize,
    /// What a commit of the SQLite store survives.
    pub sqlite_durability: SqliteDurability,
}

impl ServeConfig {
    /// Defaults for a data directory: generated ID scope and certificates, one embedded hub,
    /// the default listen addresses.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            store: StoreLocation::new(Some(data_dir.into()), None),
            id_scope: None,
            tls: None,
            mqtt_listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            https_listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            hubs: vec![HubSpec { name: DEFAULT_HUB.to_owned(), weight: 1 }],
            retry_after_secs: DEFAULT_RETRY_AFTER_SECS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            sqlite_durability: SqliteDurability::default(),
        }
    }
}

/// `message` with every double-quoted value replaced by `"…"`: the parser quotes the value it
/// could not use, which may be a password.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut parts = message.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    let rest: Vec<&str> = parts.collect();
    for (i, part) in rest.iter().enumerate() {
        // Odd parts were inside quotes; an unmatched last quote keeps what follows hidden too.
        if i % 2 == 0 {
            out.push_str("\"…\"");
        } else {
            out.push_str(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_configuration_printed_for_debugging_shows_no_database_password() {
        let settings =
            Settings { database_url: Some("postgres://zt:S3cretPw@db/zt".into()), ..Settings::default() };
        let config = settings.clone().resolve().unwrap();
        for printed in [format!("{settings:?}"), format!("{config:?}")] {
            assert!(!printed.contains("S3cretPw") && printed.contains("<redacted>"), "{printed}");
        }
        assert_eq!(config.store.database_url.unwrap().as_str(), "postgres://zt:S3cretPw@db/zt");
    }

    #[test]
    fn no_settings_mean_the_embedded_default() {
        let c = Settings::default().resolve().unwrap();
        assert_eq!(c.store.data_dir, PathBuf::from("zerotouch-data"));
        assert_eq!(c.store.database_url, None);
        assert_eq!(c.mqtt_listen.to_string(), "127.0.0.1:8883");
        assert_eq!(c.https_listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.hubs, vec![HubSpec { name: "localhost".into(), weight: 1 }]);
        assert_eq!(c.tls, None);
        assert_eq!(c.retry_after_secs, 3);
    }

    #[test]
    fn retry_after_comes_from_the_flag_or_the_config_file_within_one_to_three_hundred_seconds() {
        let file = Settings::from_toml("retry-after = 1").unwrap();
        assert_eq!(Settings::default().or(file.clone()).resolve().unwrap().retry_after_secs, 1);
        let flags = Settings { retry_after: Some(300), ..Settings::default() };
        assert_eq!(flags.or(file).resolve().unwrap().retry_after_secs, 300);
        for bad in [0, 301] {
            let s = Settings { retry_after: Some(bad), ..Settings::default() };
            assert!(s.resolve().unwrap_err().to_string().contains("retry-after"), "{bad}");
        }
    }

    #[test]
    fn sqlite_durability_comes_from_the_flag_or_the_config_file_and_not_with_postgres() {
        assert_eq!(Settings::default().resolve().unwrap().sqlite_durability, SqliteDurability::ProcessCrash);
        let file = Settings::from_toml("sqlite-durability = \"power-loss\"").unwrap();
        assert_eq!(
            Settings::default().or(file.clone()).resolve().unwrap().sqlite_durability,
            SqliteDurability::PowerLoss
        );
        let flags =
            Settings { sqlite_durability: Some(SqliteDurability::ProcessCrash), ..Settings::default() };
        assert_eq!(
            flags.or(file.clone()).resolve().unwrap().sqlite_durability,
            SqliteDurability::ProcessCrash
        );
        assert!(Settings::from_toml("sqlite-durability = \"paranoid\"").is_err());
        let postgres = Settings { database_url: Some("postgres://db/zt".into()), ..file };
        let Err(ServerError::Config(message)) = postgres.resolve() else {
            panic!("accepted with PostgreSQL")
        };
        assert!(message.contains("synchronous_commit"), "{message}");
    }

    #[test]
    fn max_connections_comes_from_the_flag_or_the_config_file_and_is_at_least_one() {
        assert_eq!(Settings::default().resolve().unwrap().max_connections, DEFAULT_MAX_CONNECTIONS);
        let file = Settings::from_toml("max-connections = 2000").unwrap();
        assert_eq!(Settings::default().or(file.clone()).resolve().unwrap().max_connections, 2000);
        let flags = Settings { max_connections: Some(50), ..Settings::default() };
        assert_eq!(flags.or(file).resolve().unwrap().max_connections, 50);
        let zero = Settings { max_connections: Some(0), ..Settings::default() };
        assert!(zero.resolve().unwrap_err().to_string().contains("max-connections"));
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let file = Settings::from_toml(
            r#"
            data-dir = "/var/lib/zt"
            id-scope = "0ne00000001"
            mqtt-listen = "0.0.0.0:8883"
            hub = ["north.example:1", "south.example:3"]
            "#,
        )
        .unwrap();
        let flags = Settings { id_scope: Some("0ne000000FF".into()), ..Settings::default() };
        let c = flags.or(file).resolve().unwrap();
        assert_eq!(c.store.data_dir, PathBuf::from("/var/lib/zt"));
        assert_eq!(c.id_scope.unwrap().as_str(), "0ne000000FF");
        assert_eq!(c.mqtt_listen.to_string(), "0.0.0.0:8883");
        assert_eq!(c.hubs[1], HubSpec { name: "south.example".into(), weight: 3 });
    }

    #[test]
    fn the_log_format_may_come_from_the_config_file() {
        use crate::cli::LogFormat;
        let file = Settings::from_toml("log-format = \"json\"").unwrap();
        assert_eq!(file.log_format, Some(LogFormat::Json));
        assert_eq!(Settings::default().or(file).log_format, Some(LogFormat::Json));
        assert_eq!(Settings::from_toml("log-format = \"text\"").unwrap().log_format, Some(LogFormat::Text));
        assert!(Settings::from_toml("log-format = \"JSON\"").is_err());
        assert!(Settings::from_toml("log_format = \"json\"").is_err(), "keys are spelt as the flags");
    }

    #[test]
    fn a_config_file_with_an_unknown_key_is_refused() {
        let err = Settings::from_toml("mqtt-port = 1883").unwrap_err();
        assert!(err.to_string().contains("mqtt-port"), "{err}");
        // From a file: the file named once, the kind of error said once.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("zerotouch.toml");
        std::fs::write(&file, "mqtt-port = 1883").unwrap();
        let text = Settings::from_file(&file).unwrap_err().to_string();
        assert!(text.starts_with(&format!("configuration: {}: ", file.display())), "{text}");
        assert_eq!(text.matches("configuration:").count(), 1, "{text}");
    }

    #[test]
    fn hub_flags_reject_bad_weights_and_duplicates() {
        assert!(HubSpec::parse("a.example:0").is_err());
        assert!(HubSpec::parse("a.example:x").is_err());
        assert!(HubSpec::parse("bad/name").is_err());
        let dup = Settings { hub: vec!["a.example".into(), "A.example:2".into()], ..Settings::default() };
        assert!(dup.resolve().unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn hub_names_must_be_host_names() {
        for bad in ["..", "a..b", "-a", "a-", "a.example.", ".a", "a.-b.example", &"x".repeat(64)] {
            assert!(HubSpec::parse(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["localhost", "hub-1.example.net", "HUB.Example", "a1.b2", &"x".repeat(63)] {
            assert!(HubSpec::parse(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn paths_in_a_config_file_are_relative_to_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        let file = dir.path().join("etc").join("zerotouch.toml");
        let text = "data-dir = \"data\"\ntls-cert = \"tls/c.pem\"\ntls-key = \"/abs/k.pem\"\n";
        std::fs::write(&file, text).unwrap();
        let s = Settings::from_file(&file).unwrap();
        assert_eq!(s.data_dir, Some(dir.path().join("etc").join("data")));
        assert_eq!(s.tls_cert, Some(dir.path().join("etc").join("tls/c.pem")));
        assert_eq!(s.tls_key, Some(PathBuf::from("/abs/k.pem")));
    }

    #[test]
    fn a_bad_config_line_is_named_without_echoing_it() {
        let text = "database-url = \"postgres://admin:S3cret@db/zt\"\nretry-after = \"soon\"\n";
        let err = Settings::from_toml(text).unwrap_err().to_string();
        assert!(!err.contains("S3cret"), "{err}");
        let text = "database-url = postgres://admin:S3cret@db/zt\n";
        let err = Settings::from_toml(text).unwrap_err().to_string();
        assert!(!err.contains("S3cret"), "{err}");
        assert!(err.contains("line 1"), "{err}");
        // Nor a value of the wrong type, which the parser's message would quote.
        for text in ["hub = \"postgres://u:S3cret@h/db\"\n", "retry-after = \"S3cret\"\n"] {
            let err = Settings::from_toml(text).unwrap_err().to_string();
            assert!(!err.contains("S3cret") && err.contains("line 1"), "{err}");
        }
    }

    #[test]
    fn certificate_without_key_is_refused() {
        let s = Settings { tls_cert: Some("c.pem".into()), ..Settings::default() };
        assert!(s.resolve().is_err());
    }
}
