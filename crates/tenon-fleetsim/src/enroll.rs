//! `tenon-fleetsim enroll`: enrolls N devices as fast as the server allows and writes their
//! credentials.

use crate::args::parse_duration;
use crate::sim::{lane, merge, Ctx, CtxOptions, Kind, Source};
use anyhow::Context;
use clap::Args;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What every mode takes.
#[derive(Args)]
pub struct Common {
    /// The server's URL (http://HOST:PORT or https://HOST:PORT); several, comma-separated, are
    /// used round-robin, one per connection in turn.
    #[arg(long, value_delimiter = ',', required = true, value_name = "URL[,URL...]")]
    pub server: Vec<String>,
    /// The CA certificate(s) to trust for https, PEM (e.g. DATA_DIR/tls/ca.pem); without it the
    /// system roots.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// How long a request may take, connecting included, before it counts as a timeout.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Host names are PREFIX-00001, PREFIX-00002, ... (by enrollment order, the credentials
    /// file's line order).
    #[arg(long, default_value = "SIM", value_name = "PREFIX")]
    pub hostname_prefix: String,
    /// Print the figures as one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EnrollArgs {
    #[command(flatten)]
    pub common: Common,
    /// The enrollment token (`tenonctl enroll-token create --uses N`); also TENON_FLEETSIM_TOKEN.
    #[arg(long, env = "TENON_FLEETSIM_TOKEN", hide_env_values = true)]
    pub token: String,
    /// How many devices to enroll.
    #[arg(long)]
    pub devices: usize,
    /// Where to write one `DEVICE_ID CREDENTIAL` line per enrolled device (mode 0600).
    #[arg(long)]
    pub out: PathBuf,
    /// Concurrent keep-alive connections, each enrolling one device after the other.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
}

/// What an enrollment achieved.
pub struct Enrollment {
    /// `(DEVICE_ID, CREDENTIAL)` of every enrolled device, in enrollment order.
    pub creds: Vec<(String, String)>,
    pub seconds: f64,
    pub summary: crate::stats::Summary,
}

impl Enrollment {
    pub fn rate(&self) -> f64 {
        self.creds.len() as f64 / self.seconds
    }
}

/// Enrolls `devices` devices over `connections` keep-alive connections (round robin over the
/// servers), printing progress on stderr every 5 s.
pub async fn enroll_devices(
    common: &Common,
    token: &str,
    devices: usize,
    connections: usize,
) -> anyhow::Result<Enrollment> {
    let targets = crate::client::targets(&common.server, common.ca_file.as_deref())?;
    let start = Instant::now();
    let ctx = Arc::new(Ctx::new(CtxOptions {
        timeout: common.timeout,
        start,
        measure_from: start,
        deadline: start + Duration::from_secs(100 * 365 * 86400),
        devices: Vec::new(),
        interval: Duration::ZERO,
        jitter: 0.0,
        token: token.to_string(),
        hostname_prefix: common.hostname_prefix.clone(),
        enroll_count: Some(devices as u64),
        report_count: None,
        watch: None,
    }));
    let progress = {
        let ctx = ctx.clone();
        let n = devices;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let k = ctx.enrolled_count.load(Ordering::Relaxed);
                eprintln!("  {k}/{n} enrolled ({:.0} s)", start.elapsed().as_secs_f64());
            }
        })
    };
    let lanes: Vec<_> = (0..connections.clamp(1, devices.max(1)))
        .map(|l| tokio::spawn(lane(ctx.clone(), Kind::Enroll, Source::Closed, targets[l % targets.len()].clone())))
        .collect();
    let mut results = Vec::new();
    for l in lanes {
        results.push(l.await?);
    }
    let seconds = start.elapsed().as_secs_f64();
    progress.abort();
    let (total, _) = merge(results);
    let creds: Vec<(String, String)> = ctx.enrolled.lock().expect("enrolled").iter().flatten().cloned().collect();
    let summary = total
        .iter()
        .find(|(k, _)| *k == Kind::Enroll)
        .map(|(_, s)| s.summary(seconds))
        .unwrap_or_else(|| crate::stats::KindStats::default().summary(seconds));
    Ok(Enrollment { creds, seconds, summary })
}

/// An admin token (`tadm.…`) given where an enrollment token is expected: fleetsim creates an
/// enrollment token for `uses` devices with it (valid a day), as `tenonctl enroll-token create`
/// would. Any other token is used as it is.
pub async fn enrollment_token(common: &Common, token: &str, uses: usize) -> anyhow::Result<String> {
    if !token.starts_with("tadm.") {
        return Ok(token.to_string());
    }
    let targets = crate::client::targets(&common.server, common.ca_file.as_deref())?;
    let mut conn = crate::client::Conn::new(targets[0].clone());
    let body = json!({"uses": uses, "ttl_seconds": 86_400, "pin_ca": false});
    let req = crate::client::Req {
        method: hyper::Method::POST,
        path: "/api/v1/admin/enroll-tokens",
        bearer: Some(Arc::from(token)),
        if_none_match: None,
        json: Some(bytes::Bytes::from(body.to_string())),
    };
    let answer = conn
        .send(&req, common.timeout)
        .await
        .map_err(|e| anyhow::anyhow!("cannot create an enrollment token with the admin token: {}", e.as_str()))?;
    if answer.status != 201 && answer.status != 200 {
        anyhow::bail!(
            "the server refused to create an enrollment token with the admin token (HTTP {}); pass an enrollment \
             token (`tenonctl enroll-token create --uses N`) or an admin token with the admin role",
            answer.status
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&answer.body).context("the enrollment token answer is not JSON")?;
    v["token"].as_str().map(str::to_string).context("the enrollment token answer has no token")
}

pub async fn enroll(args: EnrollArgs) -> anyhow::Result<bool> {
    let targets = crate::client::targets(&args.common.server, args.common.ca_file.as_deref())?;
    let e = enroll_devices(&args.common, &args.token, args.devices, args.connections).await?;
    write_creds(&args.out, &e.creds)?;
    let (enrolled, seconds, summary) = (&e.creds, e.seconds, &e.summary);
    if args.common.json {
        let out = json!({
            "mode": "enroll",
            "servers": targets.iter().map(|t| t.url.clone()).collect::<Vec<_>>(),
            "devices_requested": args.devices,
            "enrolled": enrolled.len(),
            "seconds": crate::stats::round3(seconds),
            "rate_per_s": crate::stats::round3(enrolled.len() as f64 / seconds),
            "connections": args.connections,
            "out": args.out,
            "kinds": {"enroll": summary.to_json()},
        });
        println!("{out}");
    } else {
        println!(
            "enrolled {} of {} devices in {seconds:.2} s: {:.1}/s over {} connections; credentials in {}",
            enrolled.len(),
            args.devices,
            enrolled.len() as f64 / seconds,
            args.connections,
            args.out.display()
        );
        println!("{}", summary.line("enroll"));
    }
    Ok(enrolled.len() == args.devices)
}

pub fn write_creds(path: &Path, creds: &[(String, String)]) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // An existing file keeps its mode when opened: make it 0600 too.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let mut w = std::io::BufWriter::new(f);
    for (id, cred) in creds {
        writeln!(w, "{id} {cred}")?;
    }
    w.flush()?;
    Ok(())
}
