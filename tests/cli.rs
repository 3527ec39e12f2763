//! The binary itself: `serve` with flags and env vars, `--self-signed --ca-out` usable as a
//! trust anchor, SIGTERM, and `review` (stdin, file, --pod, --explain, exit codes).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::fixtures;
use testkit::https::{HttpsClient, http_get};

const BIN: &str = env!("CARGO_BIN_EXE_velero-jupyterhub");

/// Reads JSON log lines from the child's stderr until the "serving" line; returns its
/// addresses, and keeps draining stderr in a thread (so later lines never hit a closed
/// pipe), handing every line back through the join handle.
fn serving_addrs(
    stderr: impl std::io::Read + Send + 'static,
) -> (
    std::net::SocketAddr,
    std::net::SocketAddr,
    std::thread::JoinHandle<Vec<String>>,
) {
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("log line");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        seen.push(line);
        if v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("serving"))
        {
            let addr = v["addr"].as_str().expect("addr").parse().expect("addr");
            let metrics = v["ops_addr"]
                .as_str()
                .expect("ops_addr")
                .parse()
                .expect("addr");
            let rest = std::thread::spawn(move || {
                seen.extend(lines.map_while(Result::ok));
                seen
            });
            return (addr, metrics, rest);
        }
    }
    panic!("the server never said it was serving: {seen:?}");
}

#[tokio::test]
async fn serve_self_signed_with_env_vars_then_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--self-signed",
            "--no-cluster",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("VJH_OPS_LISTEN", "127.0.0.1:0")
        .env("VJH_CA_OUT", &ca_path)
        .env("VJH_LOG_FORMAT", "json")
        .env("VJH_CLAIMS", "home-*")
        .env("VJH_SHUTDOWN_DELAY", "0s")
        .env("VJH_WORKER_THREADS", "3")
        .env_remove("KUBECONFIG")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().unwrap();
    let (addr, metrics, log) = tokio::task::spawn_blocking(move || serving_addrs(stderr))
        .await
        .unwrap();

    // The CA written by --ca-out is what a client trusts.
    let ca = std::fs::read_to_string(&ca_path).expect("CA bundle written");
    let client = HttpsClient::new(addr, &ca);
    let (status, body) = client.mutate(fixtures::golden_review().0).await.unwrap();
    assert_eq!(status, 200);
    // VJH_CLAIMS=home-* applies: claim-alice-smith is not a user claim here.
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["response"].get("patch").is_none(), "{v}");
    assert_eq!(http_get(metrics, "/readyz").await.0, 200);

    // SIGTERM: exits cleanly and promptly.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exited = tokio::task::spawn_blocking(move || {
        for _ in 0..100 {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        None
    })
    .await
    .unwrap();
    let status = exited.expect("exited within 5 s");
    let log = log.join().unwrap();
    assert!(status.success(), "{status:?}\n{}", log.join("\n"));
    assert!(
        log.iter().any(|l| l.contains("SIGTERM received")),
        "{log:?}"
    );
    assert!(log.last().is_some_and(|l| l.contains("stopped")), "{log:?}");
    // The runtime itself reports the workers VJH_WORKER_THREADS asked for.
    let serving = log.iter().find(|l| l.contains("\"serving: POST"));
    let serving: serde_json::Value = serde_json::from_str(serving.expect("serving line")).unwrap();
    assert_eq!(serving["workers"], 3, "{serving}");
}

#[test]
fn serve_refuses_bad_flags_with_a_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["serve"], "--tls-cert"),
        (
            &[
                "serve",
                "--self-signed",
                "--tls-cert",
                "a",
                "--tls-key",
                "b",
            ],
            "cannot be used with",
        ),
        (&["serve", "--tls-cert", "a"], "--tls-key"),
        (
            &["serve", "--self-signed", "--claims", "claim-["],
            "claim-[",
        ),
        (
            &["serve", "--self-signed", "--listen", "nowhere"],
            "--listen",
        ),
        (
            &["serve", "--self-signed", "--idle-timeout", "soon"],
            "--idle-timeout",
        ),
        // restore: a Backup, or --latest with --user; not both.
        (&["restore", "-n", "jhub"], "--from-backup"),
        (&["restore", "-n", "jhub", "--latest"], "--user"),
        (
            &[
                "restore",
                "-n",
                "jhub",
                "--latest",
                "--user",
                "a",
                "--from-backup",
                "b",
            ],
            "cannot be used with",
        ),
        (&["controller", "--max-helpers", "0"], "--max-helpers"),
        (
            &["serve", "--self-signed", "--worker-threads", "0"],
            "--worker-threads",
        ),
        (
            &["controller", "--worker-threads", "65"],
            "--worker-threads",
        ),
        (
            &["controller", "--helper-start-timeout", "soon"],
            "--helper-start-timeout",
        ),
    ];
    // Exits 2, naming what was wrong.
    let refused = |command: &mut Command, want: &[&str]| {
        let out = command.env_remove("KUBECONFIG").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{command:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(want.iter().all(|w| err.contains(w)), "{command:?}: {err}");
    };
    for (args, want) in cases {
        refused(Command::new(BIN).args(*args), &[want]);
    }
    // The Deployment's way, an env var: out of range is refused the same way.
    refused(
        Command::new(BIN)
            .args(["serve", "--self-signed", "--no-cluster"])
            .env("VJH_WORKER_THREADS", "0"),
        &["--worker-threads", "1..=64"],
    );

    // A Kubernetes configuration that is there but broken is an error, not a silent
    // fallback to running without a cluster.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--self-signed",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unusable") && err.contains("--no-cluster"),
        "{err}"
    );

    // A port in use is reported with the flag it came from.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--self-signed",
            "--no-cluster",
            "--listen",
            &port,
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--listen"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn review(args: &[&str], stdin: &[u8]) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .arg("review")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn review_answers_exactly_like_the_server() {
    let (request, expected) = fixtures::golden_review();
    let (code, out, _) = review(&[], &request);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        expected
    );

    // From a file, with --explain.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("review.json");
    std::fs::write(&file, &request).unwrap();
    let (code, out, err) = review(&["-f", file.to_str().unwrap(), "--explain"], b"");
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        expected
    );
    assert!(err.contains("jhub/jupyter-alice-smith"), "{err}");
    assert!(
        err.contains("volume-alice-smith (claim claim-alice-smith): added"),
        "{err}"
    );

    // --namespace-claims overrides --claims for that namespace only.
    let (_, out, _) = review(
        &["--claims", "claim-*", "--namespace-claims", "jhub=home-*"],
        &request,
    );
    assert!(!out.contains("\"patch\""), "{out}");
    let (_, out, _) = review(
        &["--claims", "home-*", "--namespace-claims", "other=home-*"],
        &request,
    );
    assert!(!out.contains("\"patch\""), "{out}");
    let (_, out, _) = review(
        &["--claims", "home-*", "--namespace-claims", "jhub=claim-*"],
        &request,
    );
    assert!(out.contains("\"patch\""), "{out}");

    // --pod: a Pod as kubectl prints it.
    let mut pod = fixtures::variant("jupyter-carol");
    pod["metadata"]["uid"] = "3f1c2b7e-0000-4000-8000-000000000009".into();
    pod["status"] = serde_json::json!({"phase": "Running"});
    let (code, _, err) = review(
        &["--pod", "--explain", "--claims", "claim-*,data-*"],
        pod.to_string().as_bytes(),
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("jhub/jupyter-carol"), "{err}");
    assert!(err.contains(r#""value":"volume-carol,data""#), "{err}");
}

#[test]
fn review_explains_a_restore_conversion_and_the_restore_guard() {
    // A z2jh pod as a Velero restore re-creates it: converted, and --explain says how.
    let home = "volume-alice-smith";
    let restored = fixtures::pod_create_review(&fixtures::restored_z2jh(&[home]), "r");
    let (code, out, err) = review(
        &["--explain", "--helper-image", "registry.example/pause:1"],
        &restored,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("\"allowed\":true") && out.contains("\"patch\""),
        "{out}"
    );
    assert!(err.contains(": restore_converted"), "{err}");
    assert!(
        err.contains("init container restore-wait: kept first, unchanged"),
        "{err}"
    );
    assert!(
        err.contains("registry.example/pause:1"),
        "the helper image: {err}"
    );

    // The user's own server while the claim is being restored: refused, clearly.
    let (request, _) = fixtures::golden_review();
    let (code, out, err) = review(
        &["--explain", "--restoring", "claim-alice-smith=restore-7"],
        &request,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"allowed\":false"), "{out}");
    assert!(
        out.contains("home volume claim-alice-smith is being restored by Velero restore restore-7"),
        "{out}"
    );
    assert!(err.contains(": restore_guard_denied"), "{err}");
    // As the namespace's record lists it (no Restore named).
    let (code, out, err) = review(&["--restoring", "claim-alice-smith"], &request);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("home volume claim-alice-smith is being restored by Velero; try again"),
        "{out}"
    );
    for malformed in ["=restore-7", "claim-alice-smith="] {
        let (code, _, err) = review(&["--restoring", malformed], &request);
        assert_eq!(code, Some(2), "a malformed --restoring is refused: {err}");
        assert!(err.contains("expected CLAIM or CLAIM=RESTORE"), "{err}");
    }
}

#[test]
fn review_bad_input_exits_2_with_a_reason() {
    for (args, input, want) in [
        (&[][..], &b"{"[..], "malformed AdmissionReview"),
        (
            &[][..],
            &br#"{"apiVersion":"v1","kind":"AdmissionReview"}"#[..],
            "apiVersion must be",
        ),
        (
            &["--pod"][..],
            &br#"{"kind":"Service"}"#[..],
            "expected a Pod",
        ),
        (&["--pod"][..], &b"not json"[..], "not JSON"),
    ] {
        let (code, out, err) = review(args, input);
        assert_eq!(code, Some(2), "{args:?}");
        assert!(out.is_empty());
        assert!(err.contains(want), "{err}");
    }
    let (code, _, err) = review(&["-f", "/nonexistent/review.json"], b"");
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/review.json"), "{err}");
}

#[test]
fn a_broken_stderr_pipe_does_not_crash_the_server() {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--self-signed",
            "--no-cluster",
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--shutdown-delay",
            "0s",
            "--log-format",
            "json",
        ])
        .env_remove("KUBECONFIG")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    drop(stderr); // the log reader goes away
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_deployment_in_manifests_passes_flags_the_binary_accepts() {
    use clap::Parser;
    use velero_jupyterhub::cli::{Cli, Command as Sub};
    let deployment = testkit::cluster::manifest("Deployment", "velero-jupyterhub");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut argv = vec!["velero-jupyterhub".to_owned()];
    argv.extend(
        container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned()),
    );
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Sub::Serve(serve) = cli.command else {
        panic!("not serve: {argv:?}")
    };
    // Self-managed certificates: the Secret the controller writes by default, which the
    // webhook's Role names.
    assert_eq!(
        serve.tls_secret.as_deref(),
        Some(velero_jupyterhub::controller::certs::TLS_SECRET)
    );
    assert!(serve.tls_cert.is_none() && !serve.self_signed);
    let role = testkit::cluster::manifest("Role", "velero-jupyterhub");
    assert_eq!(
        role["rules"][0]["resourceNames"],
        serde_json::json!([velero_jupyterhub::controller::certs::TLS_SECRET])
    );
    let controller = testkit::cluster::manifest("Deployment", "velero-jupyterhub-controller");
    let mut argv = vec!["velero-jupyterhub".to_owned()];
    argv.extend(
        controller["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned()),
    );
    let Sub::Controller(args) = Cli::try_parse_from(&argv).unwrap().command else {
        panic!("not controller: {argv:?}")
    };
    assert!(
        args.manage_certificates,
        "certificates are self-managed by default"
    );
    assert_eq!(
        args.tls_secret,
        velero_jupyterhub::controller::certs::TLS_SECRET
    );
    // Env values in the manifest parse too (e.g. VJH_CLAIMS).
    for env in container["env"].as_array().into_iter().flatten() {
        if env["name"] == "VJH_CLAIMS" {
            velero_jupyterhub::policy::ClaimGlobs::parse(env["value"].as_str().unwrap()).unwrap();
        }
    }
    // The probes and ports point at what the binary serves.
    let ports: Vec<&str> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(ports, ["https", "ops"]);
    let port = |i: usize| container["ports"][i]["containerPort"].as_u64().unwrap();
    assert_eq!(port(0), u64::from(serve.listen.port()));
    assert_eq!(port(1), u64::from(serve.ops_listen.port()));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    // The controller's too: its
    // operations port, and a liveness probe that gives a wedged leader well under its
    // pass deadline's order of time before the kubelet restarts it, never less than a
    // pass's own slack.
    let container = &controller["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["ports"][0]["name"], "ops");
    assert_eq!(
        container["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(args.ops_listen.port()))
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "ops", "{probe}");
    }
    let liveness = &container["livenessProbe"];
    let tolerated = liveness["periodSeconds"].as_u64().unwrap_or(10)
        * liveness["failureThreshold"].as_u64().unwrap_or(3);
    assert!(
        (30..=300).contains(&tolerated),
        "restarted after {tolerated} s of failed probes"
    );
}

#[test]
fn cli_defaults_are_the_library_defaults() {
    use clap::Parser;
    use velero_jupyterhub::cli::{Cli, Command as Sub};
    use velero_jupyterhub::webhook::serve::ServeOptions;
    let cli = Cli::try_parse_from(["velero-jupyterhub", "serve", "--self-signed"]).unwrap();
    // One worker thread, not one per core of whatever node the pod lands on. (Read from
    // the flag's definition: a VJH_WORKER_THREADS in the tests' environment would
    // override a parsed default.)
    let worker_threads = <Cli as clap::CommandFactory>::command()
        .get_arguments()
        .find(|a| a.get_id() == "worker_threads")
        .map(|a| a.get_default_values().to_vec());
    assert_eq!(worker_threads, Some(vec!["1".into()]));
    let Sub::Serve(serve) = cli.command else {
        panic!("not serve")
    };
    let lib = ServeOptions::default();
    let cli = serve.serve_options();
    assert_eq!(format!("{cli:?}"), format!("{lib:?}"));
    // Against the installed configuration: we answer (or 408) before the API server
    // gives up on us, and we keep idle connections longer than client-go's 90 s, so the
    // API server, not us, closes them.
    let webhook = testkit::cluster::manifest("MutatingWebhookConfiguration", "velero-jupyterhub");
    for hook in webhook["webhooks"].as_array().unwrap() {
        let api_server_timeout = Duration::from_secs(hook["timeoutSeconds"].as_u64().unwrap());
        assert!(lib.request_timeout < api_server_timeout, "{}", hook["name"]);
        let path = hook["clientConfig"]["service"]["path"].as_str().unwrap();
        assert!(
            ["/mutate/live", "/mutate/restore"].contains(&path),
            "{path}"
        );
    }
    assert!(lib.idle_timeout > Duration::from_secs(90));
}
