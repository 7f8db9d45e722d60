//! `vpool vol ...`: volumes.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use vpool_api::{Client, ClientError, ErrorKind, VolumeInfo};

use super::pool::every_pools_volumes;
use super::{
    Attach, CommitReport, FlattenReport, Output, VolumeInfoWithAttach, hint_force,
    hint_force_anyhow, owner_text, parse_diff_images, parse_image, render_attach, render_diff,
    render_shared_status, render_shared_table, render_volume_info, render_volume_table,
};

use crate::size::{format_size, parse_volume_size};
use crate::{image_format, transfer, vdiff};

#[derive(Debug, Subcommand)]
pub enum VolCommand {
    /// Create a thin volume (it takes no space until written).
    Create {
        /// The new volume: [POOL/]NAME (letters, digits, `.`, `_`, `-`).
        name: String,
        /// Size: 512, 4K, 20G, 1.5T (binary units; a multiple of 4K).
        #[arg(long, value_parser = parse_volume_size)]
        size: u64,
        /// A scratch disk: deleted when its last NBD client disconnects,
        /// or when the daemon restarts.
        #[arg(long)]
        ephemeral: bool,
        /// In a shared pool: what a FLUSH of this volume promises on any
        /// host that owns it, `host` (durable in its cache) or `remote`
        /// (durable in the bucket). Default: each owner's pool setting.
        #[arg(long, value_name = "host|remote")]
        durability: Option<String>,
    },
    /// List the volumes of the default pool, of one pool, or of all.
    #[command(visible_alias = "ls")]
    List {
        /// The pool's volumes (default: the default pool's).
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
        /// Every open pool's volumes, named POOL/VOLUME.
        #[arg(long, conflicts_with = "pool")]
        all: bool,
        /// Long listing: snapshots, parent, what the volume is (template,
        /// replica, ephemeral, incomplete, shared, qos) and its NBD writer.
        #[arg(short, long)]
        long: bool,
    },
    /// Space per volume and snapshot: provisioned, used, and exclusive
    /// (what deleting it frees), as `rbd du`; with a total for the pool.
    Du {
        /// One volume, [POOL/]VOLUME (default: every volume of the pool).
        name: Option<String>,
        /// The pool's volumes (default: the default pool's).
        #[arg(long, value_name = "POOL", conflicts_with = "name")]
        pool: Option<String>,
    },
    /// Show one volume, and how to attach it to a VM (NBD URI, libvirt XML).
    Info {
        /// [POOL/]VOLUME.
        name: String,
        /// Print only the libvirt `<disk>` element (for `virsh
        /// attach-device` or a domain's XML).
        #[arg(long)]
        libvirt: bool,
        /// The guest device of the libvirt disk: vda (default), vdb...,
        /// sda... (scsi), hda... (ide).
        #[arg(long, value_name = "DEV", value_parser = super::parse_target, default_value = "vda")]
        target: String,
        /// The libvirt disk over the daemon's NBD TCP listener
        /// (--nbd-listen) instead of its Unix socket.
        #[arg(long)]
        tcp: bool,
    },
    /// Who uses a volume: its NBD clients on this host (peer, image,
    /// read-only or not, since when) and its writer, as `rbd status`
    /// lists watchers; of a shared pool's volume, who owns it (host,
    /// epoch, and on the owner its clients and bytes not yet in the
    /// bucket).
    Status {
        /// [POOL/]VOLUME.
        name: String,
    },
    /// Make this host the owner of a volume of a shared pool: at once if
    /// its owner released it, once the owner's lease expired if the owner
    /// is gone (waits up to a minute), or at once with --force.
    Takeover {
        /// POOL/VOLUME, of a shared pool.
        name: String,
        /// Take it now, whether or not its owner renews its lease: the
        /// owner is fenced (its writes and flushes fail from then on).
        #[arg(long)]
        force: bool,
    },
    /// Give up a volume of a shared pool this host owns: uploads what is
    /// left and releases its lease, so another host's takeover is at once.
    Release {
        /// POOL/VOLUME, of a shared pool.
        name: String,
        /// Even while NBD clients have it open (their I/O fails).
        #[arg(long)]
        force: bool,
    },
    /// Change a volume's size.
    Resize {
        /// [POOL/]VOLUME.
        name: String,
        /// The new size: 40G, 1.5T (a multiple of 4K).
        #[arg(long, value_parser = parse_volume_size)]
        size: u64,
        /// Allow shrinking, which drops the data past the new end.
        #[arg(long)]
        allow_shrink: bool,
        /// Shrink even while NBD clients have the volume open for writing.
        #[arg(long)]
        force: bool,
    },
    /// Give a volume another name in its pool: its data, snapshots,
    /// clones, template seal, QoS limits and snapshot schedules go with it.
    /// Refused while NBD clients have it open (they reconnect by name).
    Rename {
        /// [POOL/]VOLUME.
        name: String,
        /// The new name (in the same pool; `vpool vol move` changes pools).
        new_name: String,
    },
    /// Measure I/O on a volume through the daemon's NBD server, as `rbd
    /// bench` does: IOPS, bandwidth and latency (a write bench ends with a
    /// FLUSH, counted). Writes overwrite the volume: refused on one that
    /// holds data unless --force.
    Bench {
        /// [POOL/]VOLUME.
        name: String,
        /// read, write or readwrite.
        #[arg(long, default_value = "write")]
        io_type: String,
        /// Bytes per request (512 to 4M).
        #[arg(long, default_value = "4K", value_parser = crate::size::parse_size)]
        io_size: u64,
        /// Threads, each with its own NBD connection and one request in
        /// flight.
        #[arg(long, default_value_t = 4)]
        io_threads: u32,
        /// Bytes in all.
        #[arg(long, default_value = "256M", value_parser = crate::size::parse_size)]
        io_total: u64,
        /// rand or seq.
        #[arg(long, default_value = "rand")]
        io_pattern: String,
        /// Percent of reads, for readwrite.
        #[arg(long, default_value_t = 70)]
        rw_mix_read: u32,
        /// Write over a volume that holds data.
        #[arg(long)]
        force: bool,
    },
    /// A pool's trash: `mv` a volume there (its name is free at once),
    /// `ls`, `restore`, `rm`, `purge --older-than 7d`.
    Trash {
        #[command(subcommand)]
        cmd: super::trash::TrashCommand,
    },
    /// Delete a volume and its data.
    Delete {
        /// [POOL/]VOLUME.
        name: String,
        /// Even while NBD clients have it open for writing (a running VM
        /// loses its disk).
        #[arg(long)]
        force: bool,
    },
    /// Copy a disk image into a volume (created if missing); holes and zero
    /// blocks are skipped. Raw images go as they are; qcow2, qcow, QED,
    /// VMDK, VHDX, VDI, VHD and Parallels images are detected and
    /// converted with qemu-img.
    Import {
        /// The volume to import into: [POOL/]VOLUME (created if missing).
        name: String,
        /// The image file, or `-` for raw bytes on standard input.
        file: PathBuf,
        /// Size of the volume if it is created (default: the image's size,
        /// rounded up to 4K; needed with `-`).
        #[arg(long, value_parser = parse_volume_size)]
        size: Option<u64>,
        /// Read the image as this format instead of detecting it (`raw`
        /// stores the file's bytes whatever they hold).
        #[arg(long, value_parser = image_format::parse_format)]
        format: Option<image_format::Format>,
        /// With `-`: accept a stream shorter than the volume (the rest
        /// reads as zeros); without it, a short stream is taken for a cut
        /// one.
        #[arg(long)]
        allow_short: bool,
        /// Replace the content of an existing volume; twice (`--force
        /// --force`), even while NBD clients have it open for writing.
        #[arg(long, action = clap::ArgAction::Count)]
        force: u8,
    },
    /// Copy a volume (or a snapshot, VOLUME@SNAPSHOT) into a sparse raw
    /// image file, or to standard output.
    Export {
        /// The image to export: [POOL/]VOLUME or [POOL/]VOLUME@SNAPSHOT.
        name: String,
        /// The file to write, or `-` for standard output (every byte, holes
        /// as zeros; the summary goes to standard error).
        file: PathBuf,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Let several NBD clients write a volume at once (a shared disk, a
    /// cluster filesystem); by default one client writes at a time and a
    /// second one's writes wait for it to disconnect (30 s), then fail.
    Share {
        /// [POOL/]VOLUME.
        name: String,
        /// One writer at a time again.
        #[arg(long)]
        off: bool,
    },
    /// Limit a volume's NBD requests a second and bytes a second, at once
    /// for the clients connected (as QEMU's throttle groups); with no
    /// limit given, show them. Kept with the volume.
    Qos {
        /// [POOL/]VOLUME
        volume: String,
        /// Requests a second (reads, writes, trims, zeroes).
        #[arg(long)]
        iops: Option<u64>,
        /// Bytes a second read and written (e.g. 200M).
        #[arg(long, value_parser = crate::size::parse_size)]
        bps: Option<u64>,
        /// Requests a second allowed during a burst.
        #[arg(long)]
        burst_iops: Option<u64>,
        /// Bytes a second allowed during a burst.
        #[arg(long, value_parser = crate::size::parse_size)]
        burst_bps: Option<u64>,
        /// How long a burst may last (default 1).
        #[arg(long)]
        burst_secs: Option<u64>,
        /// Remove every limit.
        #[arg(long, conflicts_with_all = ["iops", "bps", "burst_iops", "burst_bps", "burst_secs"])]
        clear: bool,
    },
    /// NBD I/O per volume, as `rbd perf image iostat`: reads and writes a
    /// second, MB/s and mean latency over each interval (volumes with no
    /// I/O in it are left out).
    Iostat {
        /// [POOL/]VOLUME; default every volume.
        volume: Option<String>,
        /// Seconds between two samples.
        #[arg(long, default_value_t = 1.0, value_parser = super::pool::parse_secs)]
        interval: f64,
        /// Samples to print (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Seal a volume as a template (gold master): read-only from then on;
    /// the SHA-256 digest of its content is recorded.
    Template {
        /// The volume to seal: [POOL/]VOLUME.
        name: String,
    },
    /// Create a copy-on-write clone of a template, or of a snapshot
    /// (VOLUME@SNAPSHOT). Instant, whatever the size.
    Clone {
        /// A template's name, or VOLUME@SNAPSHOT.
        source: String,
        /// The new volume's name.
        name: String,
    },
    /// Detach a clone from the snapshot it came from (instant in vpool:
    /// clones never read through their parent, so nothing is copied; a
    /// shared pool's clone copies its template's blocks in).
    Flatten {
        /// The clone to make independent of its template: [POOL/]VOLUME.
        name: String,
    },
    /// Move a volume into another pool while its VM runs, as a job: its
    /// NBD clients keep their connections (writes are mirrored while the
    /// data is copied, then every connection switches to the new pool);
    /// the source is deleted at the end. A cancel or a failure leaves it
    /// where it was. Waits for the job unless --detach.
    Move {
        /// [POOL/]VOLUME
        volume: String,
        /// The pool it goes to.
        pool: String,
        /// Its name there (default: the same).
        #[arg(long)]
        name: Option<String>,
        /// Print the job and return at once (`vpool job wait ID`).
        #[arg(long)]
        detach: bool,
        /// Copy at most this many bytes a second (e.g. 100M).
        #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
        max_rate: Option<u64>,
        /// Move the volume alone: its snapshots are not copied and are
        /// deleted with the source (`vol copy VOL@SNAP` one first to keep
        /// it).
        #[arg(long)]
        without_snapshots: bool,
    },
    /// Copy a volume, or one of its snapshots, into any pool the daemon
    /// holds under a new name, as a job: `vpool vol copy local/db1@nightly
    /// cold/db1-copy`. A live volume is copied as of a snapshot taken when
    /// the copy starts; holes stay holes. Waits for the job, with its
    /// progress, unless --detach.
    Copy {
        /// [POOL/]VOLUME or [POOL/]VOLUME@SNAPSHOT
        source: String,
        /// [POOL/]NAME; without a pool, the source's
        dest: String,
        /// Print the job and return at once (`vpool job wait ID`).
        #[arg(long)]
        detach: bool,
        /// Write at most this many bytes a second (e.g. 100M).
        #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
        max_rate: Option<u64>,
    },
    /// Merge a clone into its parent volume: the parent takes the clone's
    /// content, atomically. The clone stays.
    Commit {
        /// The clone to merge into its parent: [POOL/]VOLUME.
        name: String,
        /// Even while NBD clients have the parent open for writing.
        #[arg(long)]
        force: bool,
    },
    /// List the extents that changed between two images of a volume:
    /// `web1@a web1@b`, or `web1@a web1` against the live volume.
    Diff {
        /// The older image: VOLUME@SNAPSHOT.
        from: String,
        /// The newer image: VOLUME@SNAPSHOT, or VOLUME (as it is now).
        to: String,
    },
    /// Write the changes between two images of a volume to a .vdiff file
    /// (an incremental backup).
    ExportDiff {
        /// The older image (the diff's base): VOLUME@SNAPSHOT.
        from: String,
        /// The newer image: VOLUME@SNAPSHOT, or VOLUME (as it is now).
        to: String,
        /// The file to write, or `-` for standard output.
        file: PathBuf,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Apply a .vdiff file to a volume holding its base image: the volume
    /// is resized to the target size and becomes the target image.
    ImportDiff {
        /// The volume holding the diff's base image: [POOL/]VOLUME.
        name: String,
        /// The .vdiff file, or `-` for standard input (applied as it
        /// arrives: a cut or corrupt stream leaves the volume marked
        /// incomplete).
        file: PathBuf,
        /// Even while NBD clients have the volume open for writing.
        #[arg(long)]
        force: bool,
    },
}

/// The new name of a rename: `NAME`, or `POOL/NAME` in the volume's own
/// pool (a rename does not change pools).
fn same_pool_name<'a>(client: &Client, name: &str, new_name: &'a str) -> anyhow::Result<&'a str> {
    let (pool, _) = vpool_service::names::split_pool(name);
    let is_default = |p: &str| {
        (client.list_pools().ok().into_iter().flatten()).any(|s| s.default && s.name == p)
    };
    match vpool_service::names::split_pool(new_name) {
        (None, new) => Ok(new),
        (Some(p), new) if Some(p) == pool => Ok(new),
        (Some(p), new) if pool.is_none() && is_default(p) => Ok(new),
        (Some(p), _) => Err(anyhow::anyhow!(
            "{new_name} is in pool {p}, {name} {}: a rename stays in its pool; `vpool vol move` moves a volume to another pool",
            match pool {
                Some(own) => format!("in pool {own}"),
                None => "in the default pool".to_string(),
            }
        )),
    }
}

/// How long `vol takeover` and `vol release` may take: a takeover waits
/// for the owner's lease to expire (up to a minute), a release uploads
/// what is left.
const TAKEOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// `vpool vol ...`.
pub(super) fn run(
    client: &Client,
    home: &Path,
    out: Output,
    show_progress: bool,
    cmd: &VolCommand,
) -> anyhow::Result<()> {
    match cmd {
        VolCommand::Create {
            name,
            size,
            ephemeral,
            durability,
        } => {
            let info =
                client.create_volume_durable(name, *size, *ephemeral, durability.as_deref())?;
            let overcommit = overcommit_of(client, name);
            warn_overcommit(out, overcommit.as_ref());
            out.emit(&WithOvercommit { info, overcommit }, |w| {
                created_text(&w.info)
            })
        }
        VolCommand::List { pool, all, long } => list(client, out, pool.as_deref(), *all, *long),
        VolCommand::Du { name, pool } => {
            super::usage::du(client, out, name.as_deref(), pool.as_deref())
        }
        VolCommand::Share { name, off } => {
            let info = client.set_multi_writer(name, !off)?;
            out.emit(&info, |i| match i.multi_writer {
                true => format!(
                    "volume {}: several NBD clients may write it at once",
                    i.name
                ),
                false => format!("volume {}: one NBD client writes it at a time", i.name),
            })
        }
        VolCommand::Info {
            name,
            libvirt,
            target,
            tcp,
        } => {
            let disk = super::LibvirtDisk {
                target: target.clone(),
                tcp: *tcp,
            };
            info(client, home, out, name, &disk, *libvirt)
        }
        VolCommand::Status { .. } | VolCommand::Takeover { .. } | VolCommand::Release { .. } => {
            ownership(client, out, cmd)
        }
        VolCommand::Resize {
            name,
            size,
            allow_shrink,
            force,
        } => resize(client, out, name, *size, *allow_shrink, *force),
        VolCommand::Trash { cmd } => super::trash::run(client, out, cmd),
        VolCommand::Bench {
            name,
            io_type,
            io_size,
            io_threads,
            io_total,
            io_pattern,
            rw_mix_read,
            force,
        } => {
            let spec = super::bench::BenchSpec {
                io_type: io_type.clone(),
                io_size: *io_size,
                io_threads: *io_threads,
                io_total: *io_total,
                io_pattern: io_pattern.clone(),
                rw_mix_read: *rw_mix_read,
            };
            super::bench::run(client, home, out, name, &spec, *force)
        }
        VolCommand::Rename { name, new_name } => {
            let new = same_pool_name(client, name, new_name)?;
            let info = client.rename_volume(name, new)?;
            out.emit(&info, |i| format!("renamed volume {name} to {}", i.name))
        }
        VolCommand::Delete { name, force } => {
            client.delete_volume(name, *force).map_err(hint_force)?;
            out.emit(&serde_json::json!({ "deleted": name }), |_| {
                format!("deleted volume {name}")
            })
        }
        VolCommand::Import {
            name,
            file,
            size,
            format,
            allow_short,
            force,
        } => {
            let opts = transfer::ImportOptions {
                nbd: crate::nbd_target::NbdTarget::find(client, home).ok(),
                allow_short: *allow_short,
                size: *size,
                overwrite: *force >= 1,
                in_use: *force >= 2,
                format: *format,
                show_progress,
            };
            let r = transfer::import(client, name, file, &opts).map_err(hint_force_twice)?;
            out.emit(&r, |r| {
                format!(
                    "imported {} ({}, {}) into {} volume {}: {} of data sent, {} skipped as holes or zeros",
                    if r.file == "-" { "standard input" } else { &r.file },
                    r.format,
                    format_size(r.file_bytes),
                    if r.created { "new" } else { "existing" },
                    r.volume,
                    format_size(r.data_bytes),
                    format_size(r.skipped_bytes)
                )
            })
        }
        VolCommand::Export { name, file, force } => {
            let (vol, snap) = parse_image(name)?;
            let r = transfer::export(client, vol, snap, file, *force, show_progress)?;
            // Standard output holds the image.
            let out = out.to_stderr_if(file == Path::new("-"));
            out.emit(&r, |r| {
                let (to, rest) = match r.file.as_str() {
                    "-" => ("standard output", "zeros"),
                    f => (f, "holes"),
                };
                format!(
                    "exported volume {} ({}) to {to}: {} of data, the rest as {rest}",
                    r.volume,
                    format_size(r.size_bytes),
                    format_size(r.data_bytes)
                )
            })
        }
        other => run_lineage(client, out, show_progress, other),
    }
}

/// `vol list`: one pool's volumes (with owners, for a shared pool), or
/// every pool's.
fn list(
    client: &Client,
    out: Output,
    pool: Option<&str>,
    all: bool,
    long: bool,
) -> anyhow::Result<()> {
    let list = if all {
        vpool_api::VolumeList {
            volumes: every_pools_volumes(client)?,
            shared: None,
        }
    } else {
        client.clone().in_pool(pool).list_volumes_full()?
    };
    out.emit(&list, |l| match &l.shared {
        Some(shared) => render_shared_table(shared),
        None if long => super::usage::render_long(&l.volumes),
        None => render_volume_table(&l.volumes),
    })
}

/// `vol status`, `vol takeover`, `vol release`: who owns a volume of a
/// shared pool, and moving it.
fn ownership(client: &Client, out: Output, cmd: &VolCommand) -> anyhow::Result<()> {
    let slow = client.clone().with_timeout(TAKEOVER_TIMEOUT);
    match cmd {
        VolCommand::Status { name } => match client.volume_owner(name) {
            Ok(st) => out.emit(&st, render_shared_status),
            // Not a shared pool: this host's clients of the volume.
            Err(e) if e.kind() == Some(ErrorKind::NotSupported) => {
                let info = client.volume_info(name)?;
                let st = serde_json::json!({
                    "name": info.name,
                    "writer": info.writer,
                    "clients": info.clients,
                });
                out.emit(&st, |_| super::usage::render_status(name, &info))
            }
            Err(e) => Err(e.into()),
        },
        VolCommand::Takeover { name, force } => {
            let st = slow.takeover_volume(name, *force)?;
            out.emit(&st, |s| {
                format!("{name}: owned by this host ({})\n", owner_text(s))
            })
        }
        VolCommand::Release { name, force } => {
            slow.release_volume(name, *force).map_err(hint_force)?;
            out.emit(&serde_json::json!({ "released": name }), |_| {
                format!(
                    "released volume {name}: everything is in the bucket and its lease is free\n"
                )
            })
        }
        _ => unreachable!("ownership() is called for status, takeover and release only"),
    }
}

/// The commands about a volume's relatives: templates, clones, commits,
/// diffs.
fn run_lineage(
    client: &Client,
    out: Output,
    show_progress: bool,
    cmd: &VolCommand,
) -> anyhow::Result<()> {
    match cmd {
        VolCommand::Qos {
            volume,
            iops,
            bps,
            burst_iops,
            burst_bps,
            burst_secs,
            clear,
        } => {
            let limits = vpool_api::QosLimits {
                iops: *iops,
                bps: *bps,
                burst_iops: *burst_iops,
                burst_bps: *burst_bps,
                burst_secs: *burst_secs,
            };
            let info = if limits == vpool_api::QosLimits::default() && !clear {
                client.volume_info(volume)?
            } else {
                client.set_qos(volume, &limits)?
            };
            out.emit(&info, |v| match &v.qos {
                Some(q) => format!(
                    "{}: QoS {}",
                    v.name,
                    serde_json::to_string(q).unwrap_or_default()
                ),
                None => format!("{}: no QoS limits", v.name),
            })
        }
        VolCommand::Iostat {
            volume,
            interval,
            count,
        } => super::iostat::run(client, out, volume.as_deref(), *interval, *count),
        VolCommand::Template { name } => {
            let info = client.make_template(name)?;
            out.emit(&info, template_text)
        }
        VolCommand::Copy {
            source,
            dest,
            detach,
            max_rate,
        } => {
            let (vol, snap) = parse_image(source)?;
            // A destination without a pool is in the source's pool.
            let dest = match (dest.contains('/'), vol.split_once('/')) {
                (false, Some((pool, _))) => format!("{pool}/{dest}"),
                _ => dest.to_string(),
            };
            let job = client.copy_volume(vol, snap, &dest, *max_rate)?;
            follow_job(client, out, show_progress, job, *detach)
        }
        VolCommand::Move {
            volume,
            pool,
            name,
            detach,
            max_rate,
            without_snapshots,
        } => {
            let req = vpool_api::MoveRequest {
                to_pool: pool.clone(),
                name: name.clone(),
                max_rate_bytes_per_sec: *max_rate,
                without_snapshots: *without_snapshots,
            };
            let job = client.move_volume(volume, &req)?;
            follow_job(client, out, show_progress, job, *detach)
        }
        VolCommand::Clone { source, name } => {
            let (vol, snap) = parse_image(source)?;
            let info = client.clone_volume(vol, snap, name)?;
            let from = match snap {
                Some(_) => source.clone(),
                None => format!("template {vol}"),
            };
            out.emit(&info, |info| {
                format!(
                    "created volume {} ({}) as a copy-on-write clone of {from}",
                    info.name,
                    format_size(info.size_bytes)
                )
            })
        }
        VolCommand::Flatten { name } => flatten(client, out, name),
        VolCommand::Commit { name, force } => {
            let parent = client.commit(name, *force).map_err(hint_force)?;
            let report = CommitReport {
                clone: name.clone(),
                parent,
            };
            out.emit(&report, |r| {
                format!(
                    "committed {name} into its parent: volume {} now holds {name}'s content ({})",
                    r.parent.name,
                    format_size(r.parent.size_bytes)
                )
            })
        }
        VolCommand::Diff { from, to } => {
            let (vol, f, t) = parse_diff_images(from, to)?;
            let d = client.diff(vol, f, t)?;
            out.emit(&d, render_diff)
        }
        VolCommand::ExportDiff {
            from,
            to,
            file,
            force,
        } => {
            let (vol, f, t) = parse_diff_images(from, to)?;
            let r = vdiff::export_diff(client, vol, f, t, file, *force, show_progress)?;
            let out = out.to_stderr_if(file == Path::new("-"));
            out.emit(&r, |r| {
                format!(
                    "wrote {}: {from} -> {to} ({} target), {} records: {} of data, {} zeroed; file {}",
                    r.file,
                    format_size(r.target_size_bytes),
                    r.records,
                    format_size(r.data_bytes),
                    format_size(r.zero_bytes),
                    format_size(r.file_bytes)
                )
            })
        }
        VolCommand::ImportDiff { name, file, force } => {
            let r = vdiff::import_diff(client, name, file, *force, show_progress)
                .map_err(hint_force_anyhow)?;
            out.emit(&r, import_diff_text)
        }
        other => unreachable!("{other:?} is run by `run`"),
    }
}

/// An import refused because NBD clients write the volume: `--force`
/// twice replaces it anyway (once only replaces an idle volume).
fn hint_force_twice(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<ClientError>() {
        Ok(c) => super::hint_override(c, "pass --force twice to replace its content anyway").into(),
        Err(e) => e,
    }
}

fn created_text(info: &VolumeInfo) -> String {
    if info.ephemeral {
        format!(
            "created ephemeral volume {} ({}): deleted when its last NBD client disconnects, or when the daemon restarts",
            info.name,
            format_size(info.size_bytes)
        )
    } else {
        format!(
            "created volume {} ({})",
            info.name,
            format_size(info.size_bytes)
        )
    }
}

/// `vol info`: the volume, and how a VM attaches it.
fn info(
    client: &Client,
    home: &Path,
    out: Output,
    name: &str,
    disk: &super::LibvirtDisk,
    only_libvirt: bool,
) -> anyhow::Result<()> {
    let info = client.volume_info(name)?;
    // The pool info says whether the daemon also serves NBD on TCP.
    let nbd_tcp = client.pool_info()?.nbd_tcp_addr;
    // The export is the volume's name as the user wrote it: `POOL/VOLUME`,
    // or bare for the default pool.
    let export = match vpool_api::routes::split_pool(name) {
        (Some(pool), _) => format!("{pool}/{}", info.name),
        (None, _) => info.name.clone(),
    };
    let attach = Attach::new(&export, home, nbd_tcp, disk)?;
    if only_libvirt && !out.json {
        print!("{}", attach.libvirt_xml);
        return Ok(());
    }
    out.emit(&VolumeInfoWithAttach { info, attach }, |v| {
        format!(
            "{}{}",
            render_volume_info(&v.info),
            render_attach(&v.attach)
        )
    })
}

fn resize(
    client: &Client,
    out: Output,
    name: &str,
    size: u64,
    allow_shrink: bool,
    force: bool,
) -> anyhow::Result<()> {
    let info = client
        .resize_volume(name, size, allow_shrink, force)
        .map_err(hint_force)
        .map_err(|e| match e {
            // Name the flag; the daemon's message cannot know it.
            ClientError::Api {
                status,
                kind: kind @ ErrorKind::ShrinkRefused,
                message,
            } => ClientError::Api {
                status,
                kind,
                message: format!("{message}; pass --allow-shrink to shrink it anyway"),
            },
            e => e,
        })?;
    let overcommit = overcommit_of(client, name);
    warn_overcommit(out, overcommit.as_ref());
    out.emit(&WithOvercommit { info, overcommit }, |w| {
        format!(
            "volume {} is now {}",
            w.info.name,
            format_size(w.info.size_bytes)
        )
    })
}

/// A volume, and whether its pool promises more than its device holds.
#[derive(serde::Serialize)]
struct WithOvercommit {
    #[serde(flatten)]
    info: VolumeInfo,
    /// Set when the pool's volumes add up to more than its device can hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    overcommit: Option<Overcommit>,
}

/// A pool whose volumes' sizes add up to more than its device can hold:
/// thin provisioning, which works until the volumes are written that far.
#[derive(serde::Serialize)]
struct Overcommit {
    pool: String,
    /// The sum of the pool's volume sizes.
    provisioned_bytes: u64,
    /// What the pool has and can get: its segments plus the device's free
    /// space.
    capacity_bytes: u64,
    /// `provisioned_bytes / capacity_bytes`.
    ratio: f64,
}

/// The overcommit of the pool of volume `name`, if it is overcommitted. A
/// pool on S3 (no free space to tell) never is; a failure to ask is none.
fn overcommit_of(client: &Client, name: &str) -> Option<Overcommit> {
    let pool = vpool_api::routes::split_pool(name).0;
    let p = client.clone().in_pool(pool).pool_info().ok()?;
    let capacity = p.physical_bytes.checked_add(p.free_bytes?)?;
    (p.logical_bytes > capacity).then(|| Overcommit {
        pool: format!("pool {}", pool.unwrap_or("local")),
        provisioned_bytes: p.logical_bytes,
        capacity_bytes: capacity,
        ratio: p.logical_bytes as f64 / capacity.max(1) as f64,
    })
}

/// Says on stderr (not in the JSON on stdout) that a pool is overcommitted.
fn warn_overcommit(out: Output, o: Option<&Overcommit>) {
    if let Some(o) = o.filter(|_| !out.json) {
        eprintln!(
            "warning: {} is overcommitted: its volumes add up to {} on {} of space ({:.1}x); writes fail with ENOSPC once it fills (`vpool pool info`)",
            o.pool,
            format_size(o.provisioned_bytes),
            format_size(o.capacity_bytes),
            o.ratio
        );
    }
}

fn template_text(info: &VolumeInfo) -> String {
    let digest = info
        .template
        .as_ref()
        .and_then(|t| t.digest.clone())
        .unwrap_or_else(|| "(pending)".into());
    format!(
        "sealed volume {} as a template: read-only from now on; clone it with `vpool vol clone {} NEW`\ndigest: {digest}",
        info.name, info.name
    )
}

/// After `vol copy` or `vol move` started `job`: waits for it unless
/// `detach`, and says how it went.
fn follow_job(
    client: &Client,
    out: Output,
    show_progress: bool,
    job: vpool_api::JobInfo,
    detach: bool,
) -> anyhow::Result<()> {
    let Some(job) = super::job::follow(client, out, show_progress, job, detach)? else {
        return Ok(());
    };
    out.emit(&job, |j| {
        let data = j
            .result
            .as_ref()
            .and_then(|r| r["data_bytes"].as_u64())
            .unwrap_or(0);
        format!(
            "{} done: {} ({} of data), job {}",
            j.kind,
            j.target,
            format_size(data),
            j.id
        )
    })
}

fn flatten(client: &Client, out: Output, name: &str) -> anyhow::Result<()> {
    let done = client.flatten(name)?;
    let report = FlattenReport {
        detached_from: done.detached_from,
        instant: done.bytes_copied == 0,
        bytes_copied: done.bytes_copied,
        volume: done.volume,
    };
    out.emit(&report, |r| {
        let from = r.detached_from.as_deref().unwrap_or("its parent");
        if r.instant {
            format!(
                "flattened {}: it no longer depends on {from}. Instant: nothing was copied.",
                r.volume.name
            )
        } else {
            format!(
                "flattened {}: it no longer depends on {from}; {} of it copied in.",
                r.volume.name,
                format_size(r.bytes_copied)
            )
        }
    })
}

fn import_diff_text(r: &vdiff::ImportDiffReport) -> String {
    format!(
        "applied {} ({} -> {}) to volume {}: {} records, {} of data written, {} zeroed{}",
        r.file,
        vdiff::image_name(&r.diff_volume, r.diff_from.as_deref()),
        vdiff::image_name(&r.diff_volume, r.diff_to.as_deref()),
        r.volume,
        r.records,
        format_size(r.data_bytes),
        format_size(r.zero_bytes),
        if r.resized {
            format!("; resized to {}", format_size(r.size_bytes))
        } else {
            String::new()
        }
    )
}
