//! The CLI's argument parsing and its text output.

use super::pool::parse_secs;
use super::*;
use clap::CommandFactory;
use vpool_api::{CacheInfo, Diff, DiffKind, PinInfo, SnapshotInfo, VolumeInfo};

#[test]
fn cli_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn parses_sizes_and_globals() {
    let c = Cli::try_parse_from([
        "vpool", "vol", "create", "web1", "--size", "20G", "--json", "--home", "/p",
    ])
    .unwrap();
    assert!(c.json);
    assert_eq!(c.home, Some(PathBuf::from("/p")));
    match c.command {
        Command::Vol(VolCommand::Create {
            name,
            size,
            ephemeral,
            durability,
        }) => {
            assert_eq!(name, "web1");
            assert_eq!(size, 20 << 30);
            assert!(!ephemeral);
            assert_eq!(durability, None);
        }
        other => panic!("{other:?}"),
    }
    let e = Cli::try_parse_from(["vpool", "vol", "create", "w", "--size", "1000"]).unwrap_err();
    assert!(e.to_string().contains("not a multiple of 4096"), "{e}");
}

#[test]
fn parses_s3_pool_and_cache_commands() {
    let c = Cli::try_parse_from([
        "vpool",
        "pool",
        "create",
        "cold",
        "--s3",
        "s3://vms/pool1",
        "--endpoint",
        "http://127.0.0.1:7480",
        "--cache",
        "/var/cache/vpool",
        "--cache-size",
        "20G",
        "--seal-after",
        "0.5",
    ])
    .unwrap();
    match c.command {
        Command::Pool(PoolCommand::Create {
            name,
            dir,
            s3,
            unsafe_single_host,
        }) => {
            assert_eq!(name.as_deref(), Some("cold"));
            assert_eq!(dir, None);
            assert_eq!(s3.cache_size, Some(20 << 30));
            assert_eq!(s3.seal_after, Some(0.5));
            assert!(!unsafe_single_host);
            let st = s3.settings(Path::new("/p")).unwrap();
            assert_eq!(st.cache_dir, PathBuf::from("/var/cache/vpool"));
            let spec = s3.spec().unwrap();
            assert_eq!(spec.cache_size_bytes, 20 << 30);
            assert_eq!(spec.endpoint.as_deref(), Some("http://127.0.0.1:7480"));
        }
        other => panic!("{other:?}"),
    }
    // A local pool in a directory; --dir and --s3 exclude each other,
    // and S3 options need --s3.
    let c = Cli::try_parse_from(["vpool", "pool", "create", "fast", "--dir", "/mnt/nvme"]).unwrap();
    assert!(matches!(
        c.command,
        Command::Pool(PoolCommand::Create { dir: Some(d), .. }) if d == Path::new("/mnt/nvme")
    ));
    for bad in [
        &[
            "vpool",
            "pool",
            "create",
            "x",
            "--dir",
            "/d",
            "--s3",
            "s3://b",
            "--cache-size",
            "1G",
        ][..],
        &["vpool", "pool", "create", "x", "--cache-size", "1G"],
        &["vpool", "pool", "create", "x", "--s3", "s3://b"],
        &["vpool", "vol", "list", "--pool", "a", "--all"],
    ] {
        assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
    }
    let c = Cli::try_parse_from(["vpool", "vol", "list", "--pool", "cold"]).unwrap();
    assert!(matches!(
        c.command,
        Command::Vol(VolCommand::List { pool: Some(p), all: false, long: false }) if p == "cold"
    ));
    // --cache defaults to --home.
    let c = Cli::try_parse_from([
        "vpool",
        "--home",
        "/p",
        "pool",
        "attach",
        "--s3",
        "s3://b",
        "--cache-size",
        "1G",
    ])
    .unwrap();
    match c.command {
        Command::Pool(PoolCommand::Attach { s3, .. }) => {
            assert_eq!(
                s3.settings(c.home.as_deref().unwrap()).unwrap().cache_dir,
                PathBuf::from("/p")
            );
        }
        other => panic!("{other:?}"),
    }
    for bad in ["0", "-1", "x", "inf"] {
        assert!(parse_secs(bad).is_err(), "{bad}");
    }
    let c = Cli::try_parse_from(["vpool", "cache", "pin", "db1@suspended"]).unwrap();
    assert!(
        matches!(c.command, Command::Cache(CacheCommand::Pin { image }) if image == "db1@suspended")
    );
    let c = Cli::try_parse_from(["vpool", "serve", "--force"]).unwrap();
    assert!(matches!(
        c.command,
        Command::Serve(ServeArgs { force: true, .. })
    ));
}

#[test]
fn renders_cache_stats_and_pins() {
    let c = CacheInfo {
        remote: "s3://vms/pool1".into(),
        cache_size_bytes: 20 << 30,
        cached_bytes: 5 << 30,
        dirty_bytes: 3 << 20,
        pinned_bytes: 1 << 30,
        pins: 2,
        read_hits: 973,
        read_misses: 27,
        hit_ratio: 0.973,
        upload_lag_bytes: 32 << 20,
        upload_lag_seconds: 3.12,
        upload_mb_per_s: 85.25,
        holder: "host1:42".into(),
        fencing: "atomic".into(),
        ..CacheInfo::default()
    };
    let t = render_cache_stats(&c);
    assert!(
        t.contains("hit ratio:    97.3% (973 hits, 27 misses)\n"),
        "{t}"
    );
    assert!(
        t.contains("cached:       5 GiB (25.0% of the cache)\n"),
        "{t}"
    );
    assert!(t.contains("pinned:       1 GiB (2 pins)\n"), "{t}");
    assert!(t.contains("upload lag:   32 MiB, 3.1 s\n"), "{t}");
    assert!(t.contains("85.2 MB/s"), "{t}");
    assert!(t.contains("fenced:       no\n"), "{t}");
    assert!(
        t.ends_with(
            "durability:   host: a flush is in this cache; the bucket lags by the seal interval\n"
        ),
        "{t}"
    );
    let t = render_cache_stats(&CacheInfo {
        fenced: Some("taken over by host2".into()),
        durability: "remote".into(),
        journal_entries: 12,
        journal_bytes: 3 << 20,
        ..c
    });
    assert!(t.contains("fenced:       YES"), "{t}");
    assert!(t.contains("durability:   remote: a flush is in the bucket when acknowledged (12 journal entries, 3 MiB)\n"), "{t}");
    assert_eq!(render_pins(&[]), "no pins\n");
    let t = render_pins(&[
        PinInfo {
            volume: "db1".into(),
            snapshot: Some("suspended".into()),
            bytes: Some(3 << 30),
            error: None,
        },
        PinInfo {
            volume: "gone".into(),
            snapshot: None,
            bytes: None,
            error: Some("volume \"gone\" not found".into()),
        },
    ]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines[0], "IMAGE          DATA   STATUS");
    assert_eq!(lines[1], "db1@suspended  3 GiB  pinned");
    assert!(
        lines[2].starts_with("gone") && lines[2].contains("pins nothing"),
        "{t}"
    );
}

#[test]
fn tcp_listen_needs_a_token_file() {
    assert!(Cli::try_parse_from(["vpool", "serve", "--api-listen", "127.0.0.1:1"]).is_err());
    assert!(
        Cli::try_parse_from([
            "vpool",
            "serve",
            "--api-listen",
            "127.0.0.1:1",
            "--api-token-file",
            "t"
        ])
        .is_ok()
    );
}

#[test]
fn libvirt_disk_target_tcp_and_reconnect() {
    let tcp = Some("10.1.2.3:10809".parse().unwrap());
    let disk = LibvirtDisk {
        target: "vdb".into(),
        tcp: true,
    };
    let a = Attach::new("local/db", Path::new("/p"), tcp, &disk).unwrap();
    let xml = &a.libvirt_xml;
    assert!(
        xml.contains("<host name='10.1.2.3' port='10809'/>"),
        "{xml}"
    );
    assert!(xml.contains("<reconnect delay='10'/>"), "{xml}");
    assert!(xml.contains("<target dev='vdb' bus='virtio'/>"), "{xml}");
    assert!(xml.contains("name='local/db'"), "{xml}");
    let v6 = Some("[::1]:10809".parse().unwrap());
    let a = Attach::new("db", Path::new("/p"), v6, &disk).unwrap();
    assert!(
        a.libvirt_xml.contains("<host name='::1' port='10809'/>"),
        "{}",
        a.libvirt_xml
    );
    let e = Attach::new("db", Path::new("/p"), None, &disk).unwrap_err();
    assert!(e.to_string().contains("--nbd-listen"), "{e}");
    let sda = LibvirtDisk {
        target: "sdc".into(),
        tcp: false,
    };
    let a = Attach::new("db", Path::new("/p"), None, &sda).unwrap();
    assert!(a.libvirt_xml.contains("<target dev='sdc' bus='scsi'/>"));
    for bad in ["", "vd", "vd1", "nvme0", "vda'/><x"] {
        assert!(parse_target(bad).is_err(), "{bad}");
    }
    assert_eq!(parse_target("xvdb").as_deref(), Ok("xvdb"));
}

#[test]
fn attach_details_escape_and_name_hosts() {
    let d = LibvirtDisk::default();
    let a = Attach::new("web1", Path::new("/srv/my pool&x"), None, &d).unwrap();
    assert_eq!(
        a.nbd_uri,
        "nbd+unix:///web1?socket=/srv/my%20pool%26x/nbd.sock"
    );
    assert_eq!(a.nbd_socket, PathBuf::from("/srv/my pool&x/nbd.sock"));
    assert_eq!(
        a.qemu_json,
        r#"json:{"driver":"raw","file":{"driver":"nbd","export":"web1","server":{"path":"/srv/my pool&x/nbd.sock","type":"unix"}}}"#
    );
    assert!(
        a.libvirt_xml
            .contains("<host transport='unix' socket='/srv/my pool&amp;x/nbd.sock'/>"),
        "{}",
        a.libvirt_xml
    );
    assert_eq!(a.nbd_tcp_uri, None);
    let a = Attach::new(
        "db",
        Path::new("/p"),
        Some("10.1.2.3:10809".parse().unwrap()),
        &d,
    )
    .unwrap();
    assert_eq!(a.nbd_tcp_uri.as_deref(), Some("nbd://10.1.2.3:10809/db"));
    let a = Attach::new(
        "db",
        Path::new("/p"),
        Some("[::1]:10809".parse().unwrap()),
        &d,
    )
    .unwrap();
    assert_eq!(a.nbd_tcp_uri.as_deref(), Some("nbd://[::1]:10809/db"));
    let a = Attach::new(
        "db",
        Path::new("/p"),
        Some("[::]:10809".parse().unwrap()),
        &d,
    )
    .unwrap();
    let tcp = a.nbd_tcp_uri.unwrap();
    assert!(!tcp.contains("[::]") && tcp.ends_with(":10809/db"), "{tcp}");
    let text = render_attach(&Attach::new("db", Path::new("/p"), None, &d).unwrap());
    assert!(
        text.contains("\n  nbd+unix:///db?socket=/p/nbd.sock\n"),
        "{text}"
    );
    assert!(
        text.contains("\n  <disk type='network' device='disk'>\n"),
        "{text}"
    );
    assert!(
        text.contains("\n    <target dev='vda' bus='virtio'/>\n"),
        "{text}"
    );
}

#[test]
fn renders_a_table() {
    let v = VolumeInfo {
        name: "web1".into(),
        id: 1,
        size_bytes: 20 << 30,
        allocated_bytes: 3 << 29,
        zero_bytes: 0,
        extents: 12,
        parent: None,
        snapshots: 0,
        ephemeral: false,
        template: None,
        incomplete: false,
        replica_of: None,
        replica_point: None,
        qos: None,
        multi_writer: false,
        writer: None,
        clients: Vec::new(),
        exclusive_bytes: Some(1 << 29),
        shared_bytes: Some(1 << 30),
    };
    let t = render_volume_table(std::slice::from_ref(&v));
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("NAME"));
    assert!(
        lines[1].starts_with("web1") && lines[1].contains("20 GiB") && lines[1].contains("1.5 GiB")
    );
    assert_eq!(render_volume_table(&[]), "no volumes\n");
    assert!(render_volume_info(&v).contains("20 GiB (21474836480 bytes)"));
    assert!(render_volume_info(&v).contains("template:   no\n"));
    assert!(
        render_volume_info(&v)
            .contains("exclusive:  512 MiB (freed if deleted)\nshared:     1 GiB")
    );
}

#[test]
fn image_names() {
    assert_eq!(parse_snapshot_name("web1@a").unwrap(), ("web1", "a"));
    for bad in ["web1", "@a", "web1@", "a@b@c", ""] {
        let e = parse_snapshot_name(bad).unwrap_err().to_string();
        assert!(e.contains("VOLUME@SNAPSHOT"), "{bad}: {e}");
    }
    assert_eq!(parse_image("web1").unwrap(), ("web1", None));
    assert_eq!(parse_image("web1@s").unwrap(), ("web1", Some("s")));
    assert_eq!(
        parse_diff_images("w@a", "w").unwrap(),
        ("w", Some("a"), None)
    );
    let e = parse_diff_images("w@a", "x@b").unwrap_err().to_string();
    assert!(e.contains("one volume"), "{e}");
}

#[test]
fn renders_diffs_and_snapshot_tables() {
    let d = Diff {
        volume: "w".into(),
        from: Some("a".into()),
        to: None,
        from_size_bytes: 1 << 20,
        size_bytes: 2 << 20,
        offset: 0,
        extents: vec![
            vpool_api::DiffExtent {
                offset: 0,
                length: 4096,
                kind: DiffKind::Data,
            },
            vpool_api::DiffExtent {
                offset: 8192,
                length: 8192,
                kind: DiffKind::Zero,
            },
        ],
        next_offset: None,
    };
    let t = render_diff(&d);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines[0], "OFFSET  LENGTH  KIND");
    assert_eq!(lines[1], "0       4096    data");
    assert_eq!(lines[2], "8192    8192    zero");
    assert!(
        lines[3].starts_with("w@a -> w: 2 changed extents, 4 KiB of data, 8 KiB zeroed"),
        "{t}"
    );
    let s = SnapshotInfo {
        volume: "w".into(),
        name: "a".into(),
        size_bytes: 1 << 30,
        allocated_bytes: 0,
        seq: 17,
        created_unix_ms: Some(1_796_672_045_123),
        exclusive_bytes: Some(0),
        shared_bytes: None,
    };
    let t = render_snapshot_table("w", std::slice::from_ref(&s));
    assert!(
        t.starts_with("NAME  SIZE   ALLOCATED  EXCLUSIVE  SHARED  SEQ  CREATED (UTC)\n"),
        "{t}"
    );
    assert!(
        t.contains("0 B        -       17   2026-12-07 19:34:05"),
        "{t}"
    );
    let all = render_pool_snapshots("local", &[s]);
    assert!(all.starts_with("VOLUME  NAME  SIZE"), "{all}");
    assert_eq!(render_snapshot_table("w", &[]), "no snapshots of w\n");
}

/// Every command says what it does and every argument and flag what it
/// is, in `--help`.
#[test]
fn every_command_and_argument_has_help() {
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            if a.get_help().is_none() && a.get_long_help().is_none() && !a.is_hide_set() {
                out.push(format!("{path}: argument {}", a.get_id()));
            }
        }
        for s in cmd.get_subcommands() {
            if s.get_about().is_none() && s.get_long_about().is_none() {
                out.push(format!("{path} {}: no about", s.get_name()));
            }
            walk(s, &format!("{path} {}", s.get_name()), out);
        }
    }
    let mut out = Vec::new();
    walk(&Cli::command(), "vpool", &mut out);
    assert!(out.is_empty(), "without help text:\n{}", out.join("\n"));
}
