//! The TCP listener: `--nbd tcp:HOST:PORT`, alone or next to a Unix socket.
//! Every test runs on raw and on qcow2 disks (`both_formats!`).

mod common;

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

both_formats!(tcp_listener_serves_nbdinfo_and_qemu_io);
fn tcp_listener_serves_nbdinfo_and_qemu_io(format: Format) {
    let port = free_port();
    let mut d = Daemon::prepare_in(Server::Fleece, &[("t", 4 * MIB), ("u", MIB)], format);
    d.listeners = vec![format!("tcp:127.0.0.1:{port}")];
    d.spawn();
    let uri = format!("nbd://127.0.0.1:{port}/t");
    let info: serde_json::Value = serde_json::from_str(&run("nbdinfo", &["--json", &uri])).unwrap();
    assert_eq!(info["exports"][0]["export-name"], "t", "{info}");
    assert_eq!(info["exports"][0]["export-size"], 4 * MIB, "{info}");
    let list = run("nbdinfo", &["--list", &uri]);
    assert!(
        list.contains("export=\"t\"") && list.contains("export=\"u\""),
        "{list}"
    );
    qemu_io(&uri, &["write -P 7 0 64k", "read -P 7 0 64k"]);
    assert_file_bytes(&d.image_as_raw("t"), 0, 65536, 7);
    let out = d.stdout();
    assert!(out.contains(&uri), "stdout does not print {uri}:\n{out}");
    let st = d.cli_json(&["status"]);
    assert!(
        st["nbd"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().contains(&port.to_string())),
        "{st}"
    );
    let (_, disk) = d.api("GET", "/v1/disks/t", None);
    assert_eq!(disk["uri"], uri, "{disk}");
}

both_formats!(tcp_and_unix_listeners_serve_the_same_disk);
fn tcp_and_unix_listeners_serve_the_same_disk(format: Format) {
    let port = free_port();
    let mut d = Daemon::prepare_in(Server::Fleece, &[("disk", 8 * MIB)], format);
    d.listeners.push(format!("tcp:127.0.0.1:{port}"));
    d.spawn();
    let tcp = format!("nbd://127.0.0.1:{port}/disk");
    qemu_io(&tcp, &["write -P 0x71 1M 1M", "flush"]);
    qemu_io(&d.uri("disk"), &["read -P 0x71 1M 1M", "write -P 0x72 3M 64k"]);
    qemu_io(&tcp, &["read -P 0x72 3M 64k"]);
    run("nbdcopy", &["--connections=2", &tcp, "null:"]);
    let st = d.cli_json(&["status"]);
    assert_eq!(st["nbd"].as_array().unwrap().len(), 2, "{st}");
}
