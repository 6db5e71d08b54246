//! What the data directory keeps besides the database: the ID scope and the development
//! CA + server certificate, created on first start and reused afterwards.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use ring::rand::{SecureRandom, SystemRandom};
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
    fs::create_dir_all(dir).map_err(|e| ServerError::io(dir, e))
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
    /// The CA's private key (kept so the server certificate can be re-issued).
    pub ca_key: PathBuf,
    /// The server certificate chain (server certificate, then the CA).
    pub server_cert: PathBuf,
    /// The server certificate's private key.
    pub server_key: PathBuf,
    /// Whether this call generated them (false: reused from an earlier start).
    pub generated: bool,
}

impl DevCertificates {
    /// The server certificate and key as operator-style TLS files.
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles { cert: self.server_cert.clone(), key: self.server_key.clone() }
    }
}

/// Host names and addresses the development server certificate is valid for.
pub const DEV_SERVER_NAMES: [&str; 4] = ["localhost", "*.localhost", "127.0.0.1", "::1"];

/// The development CA and server certificate of `dir`, generated when missing. The server
/// certificate is valid for [`DEV_SERVER_NAMES`] and chains to the CA.
///
/// # Errors
/// [`ServerError::Io`] for file failures, [`ServerError::Certificate`] when generation fails
/// or existing files cannot be parsed.
pub fn dev_certificates(dir: &Path) -> Result<DevCertificates, ServerError> {
    let tls = dir.join(TLS_DIR);
    let certs = DevCertificates {
        ca_cert: tls.join("ca.pem"),
        ca_key: tls.join("ca-key.pem"),
        server_cert: tls.join("server.pem"),
        server_key: tls.join("server-key.pem"),
        generated: false,
    };
    let present = [&certs.ca_cert, &certs.ca_key, &certs.server_cert, &certs.server_key];
    if present.iter().all(|p| p.is_file()) {
        return Ok(certs);
    }
    ensure_dir(dir)?;
    if tls.exists() {
        // Another start may have renamed its complete set into place since the check above.
        if present.iter().all(|p| p.is_file()) {
            return Ok(certs);
        }
        // Some files are missing (removed by hand): make them again in place.
        write_dev_certificates(&certs)?;
        return Ok(DevCertificates { generated: true, ..certs });
    }
    // A first start writes the set into a directory of its own and renames it into place, which
    // fails when another process starting on the same data directory got there first: then that
    // one's set is the directory's, and both serve the CA that `tls/ca.pem` holds.
    let aside = dir.join(aside_name(TLS_DIR));
    ensure_dir(&aside)?;
    let aside_certs = DevCertificates {
        ca_cert: aside.join("ca.pem"),
        ca_key: aside.join("ca-key.pem"),
        server_cert: aside.join("server.pem"),
        server_key: aside.join("server-key.pem"),
        generated: true,
    };
    let written = write_dev_certificates(&aside_certs)
        .and_then(|()| fs::rename(&aside, &tls).map_err(|e| ServerError::io(&tls, e)));
    let _ = fs::remove_dir_all(&aside);
    match written {
        Ok(()) => Ok(DevCertificates { generated: true, ..certs }),
        Err(_) if present.iter().all(|p| p.is_file()) => Ok(certs),
        Err(e) => Err(e),
    }
}

/// A hidden name next to `name` that no other start uses, in this process or another.
fn aside_name(name: &str) -> String {
    static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{name}.{}.{n}", std::process::id())
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
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err)?;
    let issuer = Issuer::new(ca_params, &ca_key);

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
    let server_cert = params.signed_by(&server_key, &issuer).map_err(cert_err)?;

    write_private(&certs.ca_key, &ca_key.serialize_pem())?;
    write_private(&certs.server_key, &server_key.serialize_pem())?;
    fs::write(&certs.ca_cert, ca_cert.pem()).map_err(|e| ServerError::io(&certs.ca_cert, e))?;
    let chain = format!("{}{}", server_cert.pem(), ca_cert.pem());
    fs::write(&certs.server_cert, chain).map_err(|e| ServerError::io(&certs.server_cert, e))
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
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(ServerError::io(path, e)),
    }
}

/// Writes a private key readable by the owner only.
fn write_private(path: &Path, pem: &str) -> Result<(), ServerError> {
    use std::io::Write as _;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| ServerError::io(path, e))?;
    file.write_all(pem.as_bytes()).map_err(|e| ServerError::io(path, e))
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
