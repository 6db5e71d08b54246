//! What the data directory keeps besides the database: the ID scope and the development
//! CA + server certificate, created on first start and reused afterwards.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};
use zerotouch_proto::IdScope;

use crate::config::TlsFiles;
use crate::error::ServerError;

/// File in the data directory holding the generated ID scope.
pub const ID_SCOPE_FILE: &str = "id-scope";
/// Sub-directory of the data directory holding the development certificates.
pub const TLS_DIR: &str = "tls";
/// File in the data directory of a server whose store is not the directory's SQLite file, naming
/// that store's kind (`postgresql`; never its URL, which may hold a password).
pub const STORE_FILE: &str = "store";

/// Records in `dir` that its server keeps its store in `kind` (e.g. `postgresql`).
///
/// # Errors
/// [`ServerError::Io`].
pub fn mark_store(dir: &Path, kind: &str) -> Result<(), ServerError> {
    let path = dir.join(STORE_FILE);
    if fs::read_to_string(&path).is_ok_and(|text| text.trim() == kind) {
        return Ok(());
    }
    fs::write(&path, format!("{kind}\n")).map_err(|e| ServerError::io(path, e))
}

/// Refuses to use `dir`'s SQLite store when a server there keeps its store elsewhere (see
/// [`mark_store`]): an admin command without `--database-url` would otherwise create an empty
/// SQLite store beside it, and write or read there while the server never sees it.
///
/// # Errors
/// [`ServerError::Config`] naming the marker.
pub fn refuse_other_store(dir: &Path) -> Result<(), ServerError> {
    let path = dir.join(STORE_FILE);
    match fs::read_to_string(&path) {
        Ok(kind) => Err(ServerError::Config(format!(
            "{} is the data directory of a server whose store is {} (see {}): give --database-url \
             (remove that file to keep a SQLite store here instead)",
            dir.display(),
            kind.trim(),
            path.display()
        ))),
        Err(_) => Ok(()),
    }
}

/// Creates the data directory (and parents) when missing.
///
/// # Errors
/// [`ServerError::Io`].
pub fn ensure_dir(dir: &Path) -> Result<(), ServerError> {
    if dir.exists() && !dir.is_dir() {
        return Err(ServerError::Config(format!("data directory {}: not a directory", dir.display())));
    }
    // Owner-only: it holds the database (every key) and the development CA's key. Missing
    // parents are made as `mkdir -p` makes them; only the directory itself is private.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| ServerError::io(parent, e))?;
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| ServerError::io(dir, e))
}

/// A new ID scope in the shape DPS hands out: `0ne` and eight upper-case hex digits.
///
/// # Errors
/// [`ServerError::Config`] when the system RNG fails.
pub fn generate_id_scope() -> Result<IdScope, ServerError> {
    let mut bytes = [0u8; 4];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ServerError::Config("the system random number generator failed".into()))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
    IdScope::new(format!("0ne{hex}")).map_err(|e| ServerError::Config(e.to_string()))
}

/// The data directory's ID scope, generated and written on first use.
///
/// # Errors
/// [`ServerError::Io`], or [`ServerError::Config`] when the file holds no valid scope.
pub fn id_scope(dir: &Path) -> Result<IdScope, ServerError> {
    let path = dir.join(ID_SCOPE_FILE);
    match kept_id_scope(dir)? {
        Some(scope) => Ok(scope),
        None => {
            ensure_dir(dir)?;
            let scope = generate_id_scope()?;
            // Written aside and linked into place, which fails when another process starting on
            // the same directory got there first: then its scope is the directory's.
            let aside = dir.join(aside_name(ID_SCOPE_FILE));
            fs::write(&aside, format!("{}\n", scope.as_str())).map_err(|e| ServerError::io(&aside, e))?;
            let linked = fs::hard_link(&aside, &path);
            let _ = fs::remove_file(&aside);
            match linked {
                Ok(()) => Ok(scope),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => id_scope(dir),
                Err(e) => Err(ServerError::io(path, e)),
            }
        }
    }
}

/// The data directory's ID scope, if it has one (nothing is generated).
///
/// # Errors
/// [`ServerError::Io`], or [`ServerError::Config`] when the file holds no valid scope.
pub fn kept_id_scope(dir: &Path) -> Result<Option<IdScope>, ServerError> {
    let path = dir.join(ID_SCOPE_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => IdScope::new(text.trim())
            .map(Some)
            .map_err(|e| ServerError::Config(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ServerError::io(path, e)),
    }
}

/// Replaces the data directory's ID scope with `scope` (written aside, then renamed into place).
///
/// # Errors
/// [`ServerError::Io`].
pub fn set_id_scope(dir: &Path, scope: &IdScope) -> Result<(), ServerError> {
    let path = dir.join(ID_SCOPE_FILE);
    let aside = dir.join(aside_name(ID_SCOPE_FILE));
    fs::write(&aside, format!("{}\n", scope.as_str())).map_err(|e| ServerError::io(&aside, e))?;
    fs::rename(&aside, &path).map_err(|e| ServerError::io(path, e))
}

/// Paths of the development certificates in a data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCertificates {
    /// The development CA certificate devices must trust (`--ca`, `server_verification_cert`).
    pub ca_cert: PathBuf,
    /// The CA's private key, kept so that the server certificate can be re-issued (when its
    /// files are removed, or near the end of its validity) without a new CA.
    pub ca_key: PathBuf,
    /// The server certificate chain (server certificate, then the CA).
    pub server_cert: PathBuf,
    /// The server certificate's private key.
    pub server_key: PathBuf,
    /// Whether this call generated them all, a new CA included (false: reused from an earlier
    /// start).
    pub generated: bool,
    /// Whether this call issued a new server certificate from the kept CA (devices that trust
    /// the CA need nothing new).
    pub reissued: bool,
}

impl DevCertificates {
    /// The server certificate and key as operator-style TLS files.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles { cert: self.server_cert.clone(), key: self.server_key.clone() }
    }

    fn in_dir(tls: &Path) -> Self {
        DevCertificates {
            ca_cert: tls.join("ca.pem"),
            ca_key: tls.join("ca-key.pem"),
            server_cert: tls.join("server.pem"),
            server_key: tls.join("server-key.pem"),
            generated: false,
            reissued: false,
        }
    }
}

/// Host names and addresses the development server certificate is valid for.
pub const DEV_SERVER_NAMES: [&str; 4] = ["localhost", "*.localhost", "127.0.0.1", "::1"];

/// How long a new development CA is valid.
pub const DEV_CA_VALIDITY_DAYS: i64 = 3653;

/// How long a development server certificate is valid; it is re-issued from the kept CA at a
/// start less than [`DEV_SERVER_RENEW_DAYS`] before its end.
pub const DEV_SERVER_VALIDITY_DAYS: i64 = 825;

/// See [`DEV_SERVER_VALIDITY_DAYS`].
pub const DEV_SERVER_RENEW_DAYS: i64 = 30;

/// The development CA and server certificate of `dir`, generated when missing. The server
/// certificate is valid for [`DEV_SERVER_NAMES`] and chains to the CA. A missing server
/// certificate or key, or one that ends within [`DEV_SERVER_RENEW_DAYS`], is issued anew from
/// the kept CA; a missing CA certificate or key is an error (devices trust that CA: a new one
/// would lock them out without a word).
///
/// # Errors
/// [`ServerError::Io`] for file failures, [`ServerError::Certificate`] when generation fails
/// or existing files cannot be parsed, [`ServerError::Config`] when the CA is missing from a
/// `tls` directory that exists.
pub fn dev_certificates(dir: &Path) -> Result<DevCertificates, ServerError> {
    let tls = dir.join(TLS_DIR);
    let certs = DevCertificates::in_dir(&tls);
    if !tls.exists() {
        return first_dev_certificates(dir, &tls, certs);
    }
    if !certs.ca_cert.is_file() {
        return Err(ServerError::Config(format!(
            "{} is missing: devices trust the development CA it held. Restore it, or remove {} to \
             generate a new CA (devices then need the new ca.pem)",
            certs.ca_cert.display(),
            tls.display()
        )));
    }
    let now = OffsetDateTime::now_utc();
    let current = if certs.server_cert.is_file() && certs.server_key.is_file() {
        Some(inspect_server_pair(&certs)?)
    } else {
        None
    };
    if let Some(pair) = &current {
        // A certificate the operator put here (not issued by this CA) is theirs to renew.
        if pair.key_matches
            && (!pair.issued_by_ca || pair.not_after >= now + Duration::days(DEV_SERVER_RENEW_DAYS))
        {
            return Ok(certs);
        }
    }
    // A pair that still works is served if a new one cannot be issued (the CA key kept
    // offline, a read-only directory), with a warning.
    let usable = current.as_ref().is_some_and(|pair| pair.key_matches && pair.not_after > now);
    match reissue_server_certificate(&certs) {
        Ok(()) => Ok(DevCertificates { reissued: true, ..certs }),
        Err(e) if usable => {
            tracing::warn!(
                server_cert = %certs.server_cert.display(),
                error = %e,
                "the development server certificate ends within 30 days and could not be issued again"
            );
            Ok(certs)
        }
        Err(e) => Err(e),
    }
}

/// What [`dev_certificates`] needs to know of the server certificate and key in place.
struct ServerPair {
    not_after: OffsetDateTime,
    /// Whether the certificate's issuer is the development CA's subject.
    issued_by_ca: bool,
    /// Whether the key is the certificate's (two starts re-issuing at once may each have
    /// replaced one file of the pair).
    key_matches: bool,
}

fn inspect_server_pair(certs: &DevCertificates) -> Result<ServerPair, ServerError> {
    let bad =
        |path: &Path, e: &dyn std::fmt::Display| ServerError::Certificate(format!("{}: {e}", path.display()));
    let server_pem = read(&certs.server_cert)?;
    let (_, server) =
        x509_parser::pem::parse_x509_pem(server_pem.as_bytes()).map_err(|e| bad(&certs.server_cert, &e))?;
    let server = server.parse_x509().map_err(|e| bad(&certs.server_cert, &e))?;
    let ca_pem = read(&certs.ca_cert)?;
    let (_, ca) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).map_err(|e| bad(&certs.ca_cert, &e))?;
    let ca = ca.parse_x509().map_err(|e| bad(&certs.ca_cert, &e))?;
    let key_matches = KeyPair::from_pem(&read(&certs.server_key)?)
        .is_ok_and(|key| key.public_key_raw() == &*server.public_key().subject_public_key.data);
    Ok(ServerPair {
        not_after: server.validity().not_after.to_datetime(),
        issued_by_ca: server.issuer().as_raw() == ca.subject().as_raw(),
        key_matches,
    })
}

/// Issues a new server certificate and key from the kept CA.
fn reissue_server_certificate(certs: &DevCertificates) -> Result<(), ServerError> {
    if !certs.ca_key.is_file() {
        return Err(ServerError::Config(format!(
            "{} is missing: a new development server certificate cannot be issued without it. Restore \
             it, or give --tls-cert and --tls-key",
            certs.ca_key.display()
        )));
    }
    let ca_key = read(&certs.ca_key)?;
    let ca_key = KeyPair::from_pem(&ca_key).map_err(|e| cert_error(&certs.ca_key, &e))?;
    let ca_pem = read(&certs.ca_cert)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| cert_error(&certs.ca_cert, &e))?;
    write_server_certificate(certs, &issuer, &ca_pem)
}

/// A first start writes the set into a directory of its own and renames it into place, which
/// fails when another process starting on the same data directory got there first: then that
/// one's set is the directory's, and both serve the CA that `tls/ca.pem` holds.
fn first_dev_certificates(
    dir: &Path,
    tls: &Path,
    certs: DevCertificates,
) -> Result<DevCertificates, ServerError> {
    ensure_dir(dir)?;
    let aside = dir.join(aside_name(TLS_DIR));
    create_private_dir(&aside)?;
    let written = write_dev_certificates(&DevCertificates::in_dir(&aside))
        .and_then(|()| fs::rename(&aside, tls).map_err(|e| ServerError::io(tls, e)));
    let _ = fs::remove_dir_all(&aside);
    match written {
        Ok(()) => Ok(DevCertificates { generated: true, ..certs }),
        Err(_) if certs.server_cert.is_file() && certs.ca_cert.is_file() => dev_certificates(dir),
        Err(e) => Err(e),
    }
}

fn read(path: &Path) -> Result<String, ServerError> {
    fs::read_to_string(path).map_err(|e| ServerError::io(path, e))
}

fn cert_error(path: &Path, e: &rcgen::Error) -> ServerError {
    ServerError::Certificate(format!("{}: {e}", path.display()))
}

/// A hidden name next to `name` that no other start uses, in this process or another.
fn aside_name(name: &str) -> String {
    static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{name}.{}.{n}", std::process::id())
}

/// Validity from an hour ago (clocks of devices run behind) for `days`.
fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

/// Generates a development CA and a server certificate signed by it into the paths of `certs`.
fn write_dev_certificates(certs: &DevCertificates) -> Result<(), ServerError> {
    let cert_err = |e: rcgen::Error| ServerError::Certificate(e.to_string());

    let ca_key = KeyPair::generate().map_err(cert_err)?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "zerotouch development CA");
    ca_params.distinguished_name.push(DnType::OrganizationName, "zerotouch");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    // No name constraints: webpki refuses the `*.localhost` name under any (a wildcard is
    // not matched against constraints), and our client and every rustls device use webpki.
    validity(&mut ca_params, DEV_CA_VALIDITY_DAYS);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err)?;
    write_private(&certs.ca_key, &ca_key.serialize_pem())?;
    let ca_pem = ca_cert.pem();
    fs::write(&certs.ca_cert, &ca_pem).map_err(|e| ServerError::io(&certs.ca_cert, e))?;
    write_server_certificate(certs, &Issuer::new(ca_params, &ca_key), &ca_pem)
}

/// Issues a server certificate for [`DEV_SERVER_NAMES`] from `issuer` into the server paths of
/// `certs` (the chain ends with `ca_pem`).
fn write_server_certificate<S: rcgen::SigningKey>(
    certs: &DevCertificates,
    issuer: &Issuer<'_, S>,
    ca_pem: &str,
) -> Result<(), ServerError> {
    let cert_err = |e: rcgen::Error| ServerError::Certificate(e.to_string());
    let server_key = KeyPair::generate().map_err(cert_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "localhost");
    params.subject_alt_names = DEV_SERVER_NAMES
        .iter()
        .map(|n| match n.parse() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => (*n).try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()
        .map_err(cert_err)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, DEV_SERVER_VALIDITY_DAYS);
    let server_cert = params.signed_by(&server_key, issuer).map_err(cert_err)?;
    write_private(&certs.server_key, &server_key.serialize_pem())?;
    let chain = format!("{}{ca_pem}", server_cert.pem());
    replace(&certs.server_cert, chain.as_bytes(), false)
}

/// A directory only the owner may enter (the aside directory keys are written in).
fn create_private_dir(path: &Path) -> Result<(), ServerError> {
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(path).map_err(|e| ServerError::io(path, e))
}

/// Creates `path` as an empty file readable by the owner only, unless it exists. For the SQLite
/// database, which holds every enrollment and device key: SQLite gives its journal and WAL
/// files the database's permissions, and would create the database itself world-readable.
///
/// # Errors
/// [`ServerError::Io`].
pub fn create_private(path: &Path) -> Result<(), ServerError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // One from an older build, restored from a backup, or made by `sqlite3`: left as it
            // is (it is the operator's file), but they should know.
            if others_may_read(path) {
                tracing::warn!(
                    path = %path.display(),
                    "this file holds every enrollment and device key and other users may read it: chmod 600 it"
                );
            }
            Ok(())
        }
        Err(e) => Err(ServerError::io(path, e)),
    }
}

/// Whether users other than the owner may read `path` (false where there are no such modes).
fn others_may_read(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// Writes a private key readable by the owner only.
fn write_private(path: &Path, pem: &str) -> Result<(), ServerError> {
    replace(path, pem.as_bytes(), true)
}

/// Replaces `path` with `bytes` whole: written to a new file beside it (owner-only when
/// `private`), then renamed over it, so that a reader never sees half a file and a key never
/// inherits the mode of the file it replaces.
fn replace(path: &Path, bytes: &[u8], private: bool) -> Result<(), ServerError> {
    use std::io::Write as _;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let aside = path.with_file_name(aside_name(name));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let written = options
        .open(&aside)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .and_then(|()| fs::rename(&aside, path));
    if written.is_err() {
        let _ = fs::remove_file(&aside);
    }
    written.map_err(|e| ServerError::io(path, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn id_scope_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = id_scope(dir.path()).unwrap();
        assert!(first.as_str().starts_with("0ne") && first.as_str().len() == 11, "{first}");
        assert!(first.as_str()[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id_scope(dir.path()).unwrap(), first);
    }

    #[test]
    fn processes_starting_together_on_a_new_directory_agree_on_scope_and_certificates() {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let together = std::sync::Barrier::new(4);
            let results: Vec<(IdScope, String, String)> = std::thread::scope(|s| {
                let starts: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            together.wait();
                            let scope = id_scope(dir.path()).unwrap();
                            let certs = dev_certificates(dir.path()).unwrap();
                            let chain = fs::read_to_string(&certs.server_cert).unwrap();
                            let key = fs::read_to_string(&certs.server_key).unwrap();
                            (scope, chain, key)
                        })
                    })
                    .collect();
                starts.into_iter().map(|t| t.join().unwrap()).collect()
            });
            assert!(results.windows(2).all(|w| w[0] == w[1]), "starts disagree");
            // What each start serves is what the directory holds, and its key fits its chain.
            let on_disk = fs::read_to_string(dir.path().join(TLS_DIR).join("server.pem")).unwrap();
            assert_eq!(results[0].1, on_disk);
            let files = TlsFiles {
                cert: dir.path().join(TLS_DIR).join("server.pem"),
                key: dir.path().join(TLS_DIR).join("server-key.pem"),
            };
            zerotouch_transport::tls::server_config_from_files(&files.cert, &files.key).unwrap();
            let leftovers: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
        }
    }

    /// Issuer, subject and validity of the first certificate in `path`.
    fn read_cert(path: &Path) -> (String, String, OffsetDateTime, OffsetDateTime) {
        let pem = fs::read_to_string(path).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let validity = cert.validity();
        (
            cert.issuer().to_string(),
            cert.subject().to_string(),
            validity.not_before.to_datetime(),
            validity.not_after.to_datetime(),
        )
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_removed_server_certificate_is_issued_again_from_the_kept_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_certificates(dir.path()).unwrap();
        let ca = fs::read_to_string(&first.ca_cert).unwrap();
        let server = fs::read_to_string(&first.server_cert).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(&first.server_key, fs::Permissions::from_mode(0o644)).unwrap();
        }
        fs::remove_file(&first.server_cert).unwrap();
        let again = dev_certificates(dir.path()).unwrap();
        assert!(again.reissued && !again.generated);
        assert_eq!(fs::read_to_string(&again.ca_cert).unwrap(), ca, "the CA devices trust was replaced");
        let chain = fs::read_to_string(&again.server_cert).unwrap();
        assert_ne!(chain, server);
        assert!(chain.ends_with(&ca), "the new chain ends with the kept CA");
        #[cfg(unix)]
        assert_eq!(mode(&again.server_key), 0o600, "the new key kept the old file's mode");
        // Issued by the kept CA: same issuer name, and a TLS server accepts the pair.
        assert_eq!(read_cert(&again.server_cert).0, read_cert(&again.ca_cert).1);
        let third = dev_certificates(dir.path()).unwrap();
        assert!(!third.reissued && !third.generated);
    }

    #[test]
    fn a_removed_ca_is_an_error_not_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_certificates(dir.path()).unwrap();
        let server = fs::read_to_string(&first.server_cert).unwrap();
        fs::remove_file(&first.ca_cert).unwrap();
        let refused = dev_certificates(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("ca.pem") && refused.contains("remove"), "{refused}");
        assert_eq!(fs::read_to_string(&first.server_cert).unwrap(), server);
        assert!(!first.ca_cert.exists());
    }

    #[test]
    fn the_ca_key_is_needed_only_to_issue_a_server_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_certificates(dir.path()).unwrap();
        // Kept offline: the server starts on the pair it has.
        fs::remove_file(&first.ca_key).unwrap();
        let again = dev_certificates(dir.path()).unwrap();
        assert!(!again.reissued && !again.generated);
        // Without a server pair, it is needed, and the error says so.
        fs::remove_file(&first.server_cert).unwrap();
        let refused = dev_certificates(dir.path()).unwrap_err().to_string();
        assert!(refused.contains("ca-key.pem") && refused.contains("--tls-cert"), "{refused}");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_replaced_by_a_new_pair() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_certificates(dir.path()).unwrap();
        // As two starts re-issuing at once may leave it: one's key, the other's certificate.
        fs::write(&first.server_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let again = dev_certificates(dir.path()).unwrap();
        assert!(again.reissued);
        let third = dev_certificates(dir.path()).unwrap();
        assert!(!third.reissued, "the new pair matches");
    }

    #[test]
    fn a_server_certificate_of_another_issuer_is_left_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_certificates(dir.path()).unwrap();
        // The operator's own certificate, copied in, ending in ten days.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "operator's own");
        params.not_after = OffsetDateTime::now_utc() + Duration::days(10);
        let cert = params.self_signed(&key).unwrap();
        fs::write(&first.server_cert, cert.pem()).unwrap();
        fs::write(&first.server_key, key.serialize_pem()).unwrap();
        let again = dev_certificates(dir.path()).unwrap();
        assert!(!again.reissued);
        assert_eq!(fs::read_to_string(&again.server_cert).unwrap(), cert.pem());
    }

    #[test]
    fn development_certificates_have_bounded_validity() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dev_certificates(dir.path()).unwrap();
        let now = OffsetDateTime::now_utc();
        let (_, _, ca_from, ca_until) = read_cert(&certs.ca_cert);
        assert!(ca_from < now && ca_until < now + Duration::days(3660), "{ca_until:?}");
        let (_, _, _, until) = read_cert(&certs.server_cert);
        assert!(until > now + Duration::days(800) && until < now + Duration::days(830));
        #[cfg(unix)]
        {
            assert_eq!(mode(&certs.ca_key), 0o600);
            assert_eq!(mode(dir.path().join(TLS_DIR).as_path()) & 0o077, 0);
        }
    }

    #[test]
    fn a_server_certificate_near_its_end_is_issued_again() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dev_certificates(dir.path()).unwrap();
        // Replace the server certificate by one of the same CA that ends in ten days.
        let ca_key = KeyPair::from_pem(&fs::read_to_string(&certs.ca_key).unwrap()).unwrap();
        let ca_pem = fs::read_to_string(&certs.ca_cert).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut short = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        short.not_after = OffsetDateTime::now_utc() + Duration::days(10);
        let cert = short.signed_by(&key, &issuer).unwrap();
        fs::write(&certs.server_cert, format!("{}{ca_pem}", cert.pem())).unwrap();
        fs::write(&certs.server_key, key.serialize_pem()).unwrap();
        let again = dev_certificates(dir.path()).unwrap();
        assert!(again.reissued);
        assert!(read_cert(&again.server_cert).3 > OffsetDateTime::now_utc() + Duration::days(800));
        assert_eq!(fs::read_to_string(&again.ca_cert).unwrap(), ca_pem);
    }

    #[cfg(unix)]
    #[test]
    fn a_database_file_others_may_read_is_noticed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zerotouch.sqlite");
        create_private(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(!others_may_read(&path));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(others_may_read(&path));
        create_private(&path).unwrap();
        assert_eq!(mode(&path), 0o644, "the operator's file is left as it is");
    }

    #[cfg(unix)]
    #[test]
    fn the_data_directory_is_private_and_its_new_parents_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("var").join("zerotouch");
        ensure_dir(&data).unwrap();
        assert_eq!(mode(&data), 0o700);
        assert_ne!(mode(&dir.path().join("var")), 0o700, "a parent made private too");
    }

    #[test]
    fn development_certificates_are_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = dev_certificates(dir.path()).unwrap();
        assert!(first.generated);
        let pem = fs::read_to_string(&first.server_cert).unwrap();
        assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
        let again = dev_certificates(dir.path()).unwrap();
        assert!(!again.generated);
        assert_eq!(fs::read_to_string(&again.server_cert).unwrap(), pem);
    }
}
