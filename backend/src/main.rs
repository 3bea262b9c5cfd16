//! vnicd: the command line only; the device is `vnic_backend`.

use std::{path::PathBuf, process::ExitCode, sync::atomic::AtomicBool};

use clap::{Args, Parser, Subcommand};
use vnic_backend::{
    config::{self, Config, UplinkSpec},
    daemon, mgmt,
    nic::{coalesce::CoalConfig, DeviceConfig, RssSettings},
};

/// A vhost-user virtio-net device with RSS and offloads.
#[derive(Parser, Debug)]
#[command(name = "vnicd", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Talk to a running vnicd over its management socket.
    Ctl {
        #[arg(long)]
        mgmt: PathBuf,
        /// Request: `stats`, `link show [--json]`, `vf N SETTING VALUE...`
        /// (mac, vlan, qos, proto, spoofchk, trust, max_tx_rate, min_tx_rate,
        /// state), `coalesce [vf N] [queue Q] KEY VALUE...` (rx-usecs,
        /// rx-frames, tx-usecs, tx-frames, adaptive-rx, adaptive-tx),
        /// `coalesce show [vf N] [--json]`, or `offload [vf N] rx-gro-hw
        /// on|off`.
        #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
        request: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// vhost-user socket: listened on, or connected to with --client.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Connect to a VMM that listens on --socket.
    #[arg(long)]
    client: bool,
    /// Queue pairs (1-16).
    #[arg(long, default_value_t = 1, value_parser = |s: &str| num(s, config::check_queues))]
    queues: u16,
    /// Virtqueue size (power of two, up to 1024).
    #[arg(long, default_value_t = 256, value_parser = |s: &str| num(s, config::check_queue_size))]
    queue_size: u16,
    #[arg(long, default_value = "52:54:00:12:34:56", value_parser = config::parse_mac)]
    mac: vnic_protocol::wire::ethernet::Address,
    #[arg(long, default_value_t = 1500, value_parser = |s: &str| num(s, config::check_mtu))]
    mtu: u16,
    /// tap:NAME (created if absent), none, or for benchmarks sink and
    /// source:SIZE.
    #[arg(long, default_value = "none")]
    uplink: UplinkSpec,
    /// RSS key in hex (40 to 255 bytes); default: the Microsoft key.
    #[arg(long)]
    rss_key: Option<String>,
    /// Indirection table: comma-separated queue numbers, power-of-two many.
    #[arg(long)]
    rss_table: Option<String>,
    /// Comma-separated: ipv4 tcpv4 udpv4 ipv6 tcpv6 udpv6 ip_ex tcp_ex udp_ex.
    #[arg(long)]
    rss_hash_types: Option<String>,
    /// Management socket for `vnicd ctl`.
    #[arg(long)]
    mgmt: Option<PathBuf>,
    /// Virtual functions (0-64); VF i listens on the --socket path with
    /// `.vf<i>` appended.
    #[arg(long, default_value_t = 0)]
    vfs: usize,
    /// I=PATH: VF I's vhost-user socket instead of the default (repeatable).
    #[arg(long = "vf-socket")]
    vf_socket: Vec<String>,
    /// I:key=value,...: VF I's settings (mac, vlan, qos, proto, spoofchk,
    /// trust, max_tx_rate, min_tx_rate, state), as `ip link set DEV vf I`
    /// takes them (repeatable).
    #[arg(long = "vf")]
    vf: Vec<String>,
    /// legacy, or switchdev (a host TAP representor per VF).
    #[arg(long, default_value = "legacy")]
    eswitch: String,
    /// Switchdev: VF i's representor is this prefix, then i.
    #[arg(long, default_value = "vnicrep", value_parser = config::check_representor_prefix)]
    representor_prefix: String,
    /// Notification coalescing of every port until its driver sets its
    /// own: rx-usecs=U,rx-frames=N,tx-usecs=U,tx-frames=N,
    /// adaptive-rx=on|off,adaptive-tx=on|off (ethtool -C's names).
    #[arg(long, value_parser = |s: &str| CoalConfig::default().parse_over(s))]
    coalesce: Option<CoalConfig>,
    /// Receive segment coalescing (ethtool's rx-gro-hw) on every port from
    /// the start; `vnicd ctl offload rx-gro-hw on|off` switches it later.
    #[arg(long)]
    rx_gro_hw: bool,
    /// Worker threads for the queue pairs (1-16); by default one per pair,
    /// up to the CPUs vnicd may run on. A thread serves pairs p with
    /// p mod N equal to its number.
    #[arg(long, default_value_t = 0, value_parser = |s: &str| num(s, config::check_workers))]
    workers: u16,
    /// TOE connections (and listeners) the PF's driver may have; 0 does
    /// not offer the TOE. vnicd holds about 2 MiB of TCP buffers per
    /// connection at most, so this bounds the memory a driver can make it
    /// use.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(0..=65536))]
    toe_conns: u32,
    /// The transmit capacity, in Mbit/s, that the PF and the VFs share
    /// (all they send, to the wire or to each other); VFs'
    /// `min_tx_rate` guarantees are shares of it. 0: no limit.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=400_000))]
    link_speed: u32,
    /// Microseconds a transmit worker that emptied its ring keeps polling
    /// it before it asks the driver to kick again and sleeps (as DPDK's
    /// vhost polls always and vhost-net's busyloop_timeout does a while);
    /// 0: it sleeps at once. Costs up to that much CPU each time a busy
    /// queue goes idle, and saves a kick and a wake-up per burst while
    /// the driver keeps sending.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    poll_us: u32,
    /// Exit after the first frontend disconnects.
    #[arg(long)]
    once: bool,
}

fn num(s: &str, check: fn(u16) -> Result<u16, config::ConfigError>) -> Result<u16, String> {
    let n = s.parse::<u16>().map_err(|e| format!("{s:?}: {e}"))?;
    check(n).map_err(|e| e.to_string())
}

fn run(a: RunArgs) -> Result<(), String> {
    let socket = a.socket.ok_or("--socket is required")?;
    let rss = RssSettings::from_args(
        a.rss_key.as_deref(),
        a.rss_table.as_deref(),
        a.rss_hash_types.as_deref(),
        a.queues,
    )
    .map_err(|e| e.to_string())?;
    let vfs =
        config::vf_ports(&socket, a.mac, a.vfs, &a.vf_socket, &a.vf).map_err(|e| e.to_string())?;
    let cfg = Config {
        vfs,
        representors: config::parse_eswitch(&a.eswitch)
            .map_err(|e| e.to_string())?
            .then_some(a.representor_prefix),
        socket,
        client: a.client,
        device: DeviceConfig {
            pairs: a.queues,
            queue_size: a.queue_size,
            mac: a.mac,
            mtu: a.mtu,
            rss,
            coalesce: a.coalesce.unwrap_or_default(),
            rx_gro_hw: a.rx_gro_hw,
            workers: a.workers,
            toe_conns: a.toe_conns,
            link_speed: a.link_speed,
            poll_us: a.poll_us,
        },
        uplink: a.uplink,
        mgmt: a.mgmt,
        once: a.once,
    };
    let stop = AtomicBool::new(false);
    daemon::run(&cfg, &stop).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Cmd::Ctl { mgmt, request }) => mgmt::request(&mgmt, &request.join(" "))
            .map_err(|e| format!("{}: {e}", mgmt.display()))
            .and_then(|out| match out.strip_prefix("error: ") {
                Some(e) => Err(e.trim_end().to_owned()),
                None => {
                    print!("{out}");
                    Ok(())
                }
            }),
        None => run(cli.run),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vnicd: {e}");
            ExitCode::FAILURE
        }
    }
}
