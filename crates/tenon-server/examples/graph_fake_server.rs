//! The Graph fake (`tests/common/graph_fake.rs`) as a process, for benchmarks that run the real
//! server against a generated Entra tenant:
//! `cargo run --release -p tenon-server --example graph_fake_server -- --users 100000 --groups 500
//! --listen 127.0.0.1:8901 [--page-size 100] [--secret-file FILE]`. Prints one JSON line with the
//! URL (authority and Graph URL), tenant id, client id and secret, then serves until Ctrl-C (or
//! the end of its standard input) and prints the request counts. A line `change N` on standard
//! input changes the department of users 0..N (the next delta round reports them) and answers
//! `changed N`.

#[path = "../tests/common/graph_fake.rs"]
mod graph_fake;

use graph_fake::{GraphFake, Target};

fn usage() -> ! {
    eprintln!(
        "usage: graph_fake_server [--users N] [--groups M] [--listen 127.0.0.1:PORT] [--page-size N] [--secret-file FILE]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let (mut users, mut groups, mut listen, mut page, mut secret_file) =
        (1000u64, 10u64, "127.0.0.1:0".to_string(), 100usize, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--users" => users = value.parse().unwrap_or_else(|_| usage()),
            "--groups" => groups = value.parse().unwrap_or_else(|_| usage()),
            "--listen" => listen = value,
            "--page-size" => page = value.parse().unwrap_or_else(|_| usage()),
            "--secret-file" => secret_file = Some(value),
            _ => usage(),
        }
    }
    let addr: std::net::SocketAddr = listen.parse().unwrap_or_else(|_| usage());
    if !addr.ip().is_loopback() {
        eprintln!("graph_fake_server listens on loopback only");
        std::process::exit(2);
    }
    let fake = GraphFake::start_on(&listen, users, groups).await;
    fake.set_page_sizes(page, page, page);
    if let Some(path) = secret_file {
        if let Err(e) = std::fs::write(&path, graph_fake::CLIENT_SECRET) {
            eprintln!("cannot write {path}: {e}");
            std::process::exit(1);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "url": fake.url(),
            "tenant_id": graph_fake::TENANT_ID,
            "client_id": graph_fake::CLIENT_ID,
            "client_secret": graph_fake::CLIENT_SECRET,
            "users": users,
            "groups": groups,
        })
    );
    let fake = std::sync::Arc::new(fake);
    let control = fake.clone();
    let stdin = tokio::task::spawn_blocking(move || {
        let mut round = 0u64;
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            let Some(n) = line.trim().strip_prefix("change ").and_then(|n| n.trim().parse::<u64>().ok()) else {
                eprintln!("unknown command {line:?}; say `change N`");
                continue;
            };
            round += 1;
            let n = n.min(users);
            for i in 0..n {
                control.set_user_field(
                    &graph_fake::user_id(i),
                    "department",
                    serde_json::json!(format!("Changed {round}")),
                );
            }
            println!("changed {n}");
        }
    });
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = stdin => {}
    }
    let counts: Vec<String> = [Target::Token, Target::Users, Target::Groups, Target::Domains, Target::Other]
        .iter()
        .map(|t| format!("{t:?}={}", fake.requests(*t)))
        .collect();
    eprintln!("requests: {}", counts.join(" "));
}
