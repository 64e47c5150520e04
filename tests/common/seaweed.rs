//! A real S3 server for tests: SeaweedFS (`weed server -s3`) on free ports
//! with its own data directory, started and killed by the test.

use nixery::store::fs::BlobStore;
use nixery::store::s3::{S3Settings, S3Store};
use nixery::store::{RecordKind, Storage};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "nixerytest";
pub const SECRET_KEY: &str = "nixerytestsecret";

/// Where scripts/install-deps puts `weed`; NIXERY_WEED overrides it.
pub fn weed_path() -> PathBuf {
    let path = std::env::var_os("NIXERY_WEED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/nixery-test-venv/bin/weed"));
    assert!(
        path.is_file(),
        "{} is required by this test; scripts/install-deps installs it",
        path.display()
    );
    path
}

/// The credentials the servers under test read from the environment, as
/// they would in production. Every test sets the same values.
pub fn set_credentials() {
    std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
}

pub struct Seaweed {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// master, master grpc, volume, volume grpc, filer, filer grpc, s3, s3 grpc
    ports: [u16; 8],
}

/// Eight ports free right now (held together so they differ).
fn free_ports() -> [u16; 8] {
    let held: Vec<TcpListener> = (0..8)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    let mut ports = [0u16; 8];
    for (p, l) in ports.iter_mut().zip(&held) {
        *p = l.local_addr().expect("bound").port();
    }
    ports
}

impl Seaweed {
    /// Starts SeaweedFS and waits until its S3 gateway stores objects.
    pub async fn start() -> Seaweed {
        set_credentials();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            r#"{{"identities":[{{"name":"nixery","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        );
        std::fs::write(dir.path().join("s3.json"), config).expect("s3 config");
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        let mut weed = Seaweed {
            child: None,
            dir,
            ports: free_ports(),
        };
        // A port picked free may be taken (by a parallel test) before weed
        // binds it; weed then exits, and another set is tried.
        for _ in 0..3 {
            weed.spawn();
            if weed.wait_ready().await {
                return weed;
            }
            weed.stop();
            weed.ports = free_ports();
            // Nothing is stored yet; the master's state names old ports.
            let data = weed.dir.path().join("data");
            let _ = std::fs::remove_dir_all(&data);
            std::fs::create_dir_all(&data).expect("data dir");
        }
        panic!(
            "SeaweedFS exited at start three times:\n{}",
            weed.log_tail()
        )
    }

    fn spawn(&mut self) {
        let p = self.ports;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("weed.log"))
            .expect("weed log");
        let child = Command::new(weed_path())
            .arg("server")
            .arg(format!("-dir={}", self.dir.path().join("data").display()))
            .args([
                "-ip=127.0.0.1",
                "-s3",
                "-iam=false",
                "-master.telemetry=false",
            ])
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-s3.autoCreateBucket",
            ])
            .args(["-master.volumeSizeLimitMB=256", "-volume.max=0"])
            .arg(format!(
                "-s3.config={}",
                self.dir.path().join("s3.json").display()
            ))
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("weed log"))
            .stderr(log)
            .spawn()
            .expect("weed starts");
        self.child = Some(child);
    }

    /// Until a write through the S3 API succeeds (about 10 s); false if
    /// weed exited first.
    async fn wait_ready(&mut self) -> bool {
        let staging = BlobStore::open(&self.dir.path().join("probe")).expect("probe store");
        let store = S3Store::open(self.settings("probe"), staging).expect("s3 client");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let probe = store
                .put_record(RecordKind::Layer, "ready", b"ok".to_vec())
                .await;
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            match probe {
                Ok(()) => return true,
                Err(_) if exited => return false,
                Err(e) if Instant::now() > deadline => {
                    panic!("SeaweedFS did not become ready: {e}\n{}", self.log_tail())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
        let start = log.len().saturating_sub(3000);
        log.get(start..).unwrap_or_default().to_owned()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[6])
    }

    pub fn settings(&self, bucket: &str) -> S3Settings {
        S3Settings {
            bucket: bucket.to_owned(),
            prefix: "nixery".to_owned(),
            endpoint: Some(self.endpoint()),
            region: "us-east-1".to_owned(),
            force_path_style: true,
            redirect: false,
        }
    }

    /// `nixery serve` flags for `bucket` on this server.
    pub fn flags(&self, bucket: &str) -> Vec<String> {
        [
            "--storage-backend",
            "s3",
            "--s3-bucket",
            bucket,
            "--s3-prefix",
            "nixery",
            "--s3-endpoint",
            &self.endpoint(),
            "--s3-force-path-style",
            "--s3-lease-ttl",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A client of `bucket` with its own staging directory under `dir`.
    pub fn client(&self, bucket: &str, dir: &std::path::Path) -> S3Store {
        let staging = BlobStore::open(dir).expect("staging store");
        S3Store::open(self.settings(bucket), staging).expect("s3 client")
    }

    /// A plain S3 client of `bucket`, to damage what nixery wrote.
    pub fn raw(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()
            .expect("s3 client")
    }

    /// Kills the server (the data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.spawn();
        assert!(
            self.wait_ready().await,
            "SeaweedFS exited:\n{}",
            self.log_tail()
        );
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every blob in the bucket, each read back and hashed: a partial object
/// would not match its name.
pub async fn assert_all_blobs_whole(store: &dyn Storage) -> usize {
    use futures::TryStreamExt;
    use sha2::{Digest as _, Sha256};
    let blobs = store.list().await.expect("listing the bucket");
    for (digest, size) in &blobs {
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut s = store.read(digest, None).await.expect("reading a blob");
        while let Some(chunk) = s.try_next().await.expect("reading a blob") {
            n += chunk.len() as u64;
            h.update(&chunk);
        }
        assert_eq!(n, *size, "{digest}: listed size");
        assert_eq!(
            format!("sha256:{}", hex::encode(h.finalize())),
            digest.to_string(),
            "{digest} is not whole"
        );
    }
    blobs.len()
}
