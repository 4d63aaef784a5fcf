//! `dva`: the one binary. Lab management, running an appliance, the compute-unit process itself,
//! and the tools to look inside a running appliance.

mod bench_chaos;
mod bench_compare;
mod bench_elasticity;
mod bench_flood;
mod bench_lab;
mod chart;
mod ctl;
mod demo;
mod log;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "dva",
    version,
    about = "A distributed virtual appliance: firewall, NAT and L4 load balancing scaled out over many processes"
)]
struct Cli {
    /// Log lines as text or JSON objects (default: $DVA_LOG_FORMAT, else text); the level filter
    /// is $DVA_LOG (e.g. `debug`, `dva_mgmt=debug,info`; default info).
    #[arg(long, global = true, value_enum)]
    log_format: Option<log::LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build, show or remove the network-namespace lab (client, servers, appliance hosts).
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Run one appliance from a spec in the foreground until Ctrl-C: on this machine, between
    /// the devices the spec names, or on a lab's hosts.
    Run {
        /// The appliance spec (YAML or JSON).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Data planes to start (default: the spec's layout.dataplanes.initial).
        #[arg(long)]
        dataplanes: Option<u32>,
        /// The lab to run in (default: the lab `dva-` if it exists, else this machine).
        #[arg(long, conflicts_with = "local")]
        prefix: Option<String>,
        /// Run on this machine, in the current network namespace, whatever labs exist.
        #[arg(long)]
        local: bool,
    },
    /// Run the management tool: HTTP API, durable store, reconciler, autoscaler.
    Serve {
        /// This replica's own state: the API token, and the appliance records unless --store
        /// puts them elsewhere.
        #[arg(long, default_value = "/var/lib/dva")]
        state: PathBuf,
        /// Where appliance records live: file:DIR (default: file:<state>), or
        /// etcd://HOST:PORT[,HOST:PORT...] for several replicas, one of which (elected through
        /// etcd) reconciles while every one answers the API.
        #[arg(long, value_parser = dva_mgmt::store::StoreConfig::parse)]
        store: Option<dva_mgmt::store::StoreConfig>,
        #[arg(long, default_value = "127.0.0.1:7080")]
        listen: std::net::SocketAddr,
        /// With etcd: the address other replicas forward API calls to while this one leads
        /// (default: the address --listen bound).
        #[arg(long)]
        advertise: Option<std::net::SocketAddr>,
        /// The lab whose hosts units are placed on (default: the lab `dva-` if it exists, else
        /// this machine).
        #[arg(long, conflicts_with = "local")]
        lab: Option<String>,
        /// Place units on this machine, in the current network namespace, whatever labs exist.
        #[arg(long)]
        local: bool,
        /// Do not write the client file (~/.dva/client.json) the CLI reads.
        #[arg(long)]
        no_client_config: bool,
        /// Serve the API over TLS (1.2/1.3; no plain HTTP on the port) with this certificate:
        /// PEM, the server's first, then its chain. With --tls-key.
        #[arg(
            long,
            value_name = "FILE",
            requires = "tls_key",
            conflicts_with = "tls_auto"
        )]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve the API over TLS with a certificate from the installation CA (kept in
        /// <state>/pki/), naming the listen and advertised addresses, this host's name,
        /// 127.0.0.1 and localhost. The client file carries the CA, so the CLI trusts it.
        #[arg(long)]
        tls_auto: bool,
        /// A registered host whose agent has not answered for this long is lost: its units
        /// are replaced on other hosts (e.g. 10s).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        host_lost_after: std::time::Duration,
        /// Talk to etcd over TLS, checking the members' certificates against this CA (PEM).
        #[arg(long, value_name = "FILE")]
        etcd_cafile: Option<PathBuf>,
        /// This replica's client certificate for etcd (PEM; etcd's --client-cert-auth). With
        /// --etcd-keyfile and --etcd-cafile.
        #[arg(
            long,
            value_name = "FILE",
            requires = "etcd_keyfile",
            requires = "etcd_cafile"
        )]
        etcd_certfile: Option<PathBuf>,
        /// The private key (PEM) of --etcd-certfile.
        #[arg(long, value_name = "FILE", requires = "etcd_certfile")]
        etcd_keyfile: Option<PathBuf>,
    },
    /// Run this machine's agent: join the installation once, then start, stop and adopt the
    /// units the management tool assigns to this machine (they keep running without it).
    Agent {
        /// The management API (http://HOST:PORT or https://HOST:PORT).
        #[arg(long)]
        server: String,
        /// A one-time token from `dva join-token` (or the API token). Only needed to join: a
        /// restart reuses the certificate in --state.
        #[arg(long, default_value = "")]
        join_token: String,
        /// With an https server: the CA file its certificate chains to.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// This host's name (as `dva get` shows it).
        #[arg(long)]
        name: String,
        /// Where the agent's API listens (an address the management tool reaches; its
        /// certificate names this IP).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// This host's backplane address: units here bind it for the backplane and the manager
        /// channel.
        #[arg(long)]
        backplane: std::net::IpAddr,
        /// A label (k=v), e.g. dispatcher=true on machines holding the appliance's interfaces.
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// The agent's state: its certificate, key, the CA, its units (0700).
        #[arg(long, default_value = "/var/lib/dva/agent")]
        state: PathBuf,
        /// Where the units' sockets, logs and credentials go.
        #[arg(long, default_value = "/run/dva")]
        run_dir: PathBuf,
    },
    /// Make a one-time token (valid 1 h) for `dva agent --join-token`.
    JoinToken {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Create or replace appliances from specs ("unchanged" when one already runs that spec).
    Apply {
        /// A spec file (YAML or JSON), a directory of them, or `-` for standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Have the server check the spec and say what applying would do, changing nothing
        /// (kubectl's --dry-run=server; `--dry-run` alone means server).
        #[arg(long, value_name = "server", num_args = 0..=1, default_missing_value = "server",
              value_parser = ["server"])]
        dry_run: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Show what applying a spec would change: a unified diff of the running spec and the new
    /// one (normalised). Exit status 1 when they differ, 0 when not.
    Diff {
        /// A spec file (YAML or JSON), a directory of them, or `-` for standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Everything about one appliance at a glance: status and why, layout, units and their
    /// hosts, backends, recent events.
    Describe {
        name: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Show appliances, or one appliance with its units.
    Get {
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// After the first listing, print each change as it happens (until Ctrl-C).
        #[arg(short = 'w', long)]
        watch: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Set an appliance's number of data planes.
    Scale {
        name: String,
        #[arg(long)]
        dataplanes: u32,
        /// How long removed data planes serve their flows before exporting them (e.g. 2s).
        #[arg(long)]
        drain_deadline: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Delete an appliance (stops all its units).
    Delete {
        name: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// What the management tool did for an appliance, and why.
    Events {
        name: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// After the events so far, print new ones as they happen (until Ctrl-C).
        #[arg(short = 'w', long)]
        watch: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// The connection table across data planes (like `conntrack -L`): tuple, bucket, owning
    /// data plane, state, NAT binding or backend, packets and bytes each way, age.
    Flows {
        name: String,
        /// Source address or prefix (of the connection's original direction).
        #[arg(long)]
        src: Option<String>,
        /// Destination address or prefix.
        #[arg(long)]
        dst: Option<String>,
        /// Either end's port.
        #[arg(long)]
        port: Option<u16>,
        /// tcp, udp, icmp, icmpv6, sctp, udplite or a number.
        #[arg(long)]
        proto: Option<String>,
        /// A TCP state (established, syn_sent, time_wait...), or replied / unreplied.
        #[arg(long)]
        state: Option<String>,
        /// Only this data plane.
        #[arg(long)]
        unit: Option<u32>,
        /// Also show the copies held for failover (marked replica) and previous owners' copies
        /// of connections a current owner holds (marked previous).
        #[arg(long)]
        replicas: bool,
        /// At most this many flows (each data plane sends no more).
        #[arg(long, default_value_t = dva_unit::inspect::DEFAULT_LIMIT)]
        limit: usize,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// The role config a dispatcher or data plane runs (backplane keys redacted), like Envoy's
    /// config_dump.
    Config {
        name: String,
        /// The unit id (see `dva units NAME`).
        unit: u32,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Yaml)]
        output: Output,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Capture packets inside the dispatchers (tcpdump cannot see AF_XDP) into a pcap file:
    /// the frames of one interface, received and sent, or the backplane datagrams (GENEVE on
    /// port 6081, sealed as on the wire).
    Capture {
        name: String,
        /// A spec interface name (outside, inside...) or `backplane` (default: the spec's first
        /// interface).
        #[arg(short = 'i', long)]
        interface: Option<String>,
        /// Only this dispatcher (default: every dispatcher, merged).
        #[arg(long)]
        unit: Option<u32>,
        /// Stop after this many packets.
        #[arg(short = 'c', long, default_value_t = dva_unit::inspect::DEFAULT_CAPTURE_COUNT)]
        count: u64,
        /// Stop after this long (at most 600s).
        #[arg(long, default_value = "10s")]
        duration: String,
        /// Bytes kept of each packet.
        #[arg(short = 's', long)]
        snaplen: Option<usize>,
        /// The pcap file to write (`-`: standard output).
        #[arg(short = 'w', long = "write")]
        write: PathBuf,
        /// A small filter, words joined by `and`: `host ADDR`, `port N`, `proto N`, or one of
        /// tcp, udp, icmp, icmpv6, sctp (not BPF). For the backplane it applies to the packet
        /// each datagram carries.
        filter: Vec<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// A live stream of the data planes' flow events (connections created, with the rule that
    /// accepted them, and expired) and drop events (reason, rule, tuple), sampled per unit,
    /// like hubble observe.
    Monitor {
        name: String,
        /// flow, drop or all.
        #[arg(long = "type", default_value = "all")]
        kind: String,
        /// Only this data plane (default: every data plane, merged).
        #[arg(long)]
        unit: Option<u32>,
        /// Events a second per unit, at most; the rest are counted as lost.
        #[arg(long, default_value_t = dva_unit::monitor::DEFAULT_RATE)]
        rate: u32,
        /// Source or destination address.
        #[arg(long)]
        host: Option<String>,
        /// Source or destination port.
        #[arg(long)]
        port: Option<u16>,
        /// tcp, udp, icmp, icmpv6, sctp, udplite or a number.
        #[arg(long)]
        proto: Option<String>,
        /// Stop after this long (default: until Ctrl-C; the server ends a session after 1h).
        #[arg(long)]
        duration: Option<String>,
        /// `json`: the events as the server sends them, one JSON object per line.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// An appliance's units.
    Units {
        name: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Show the units of a running appliance and their counters.
    Stats {
        name: String,
        #[arg(long, default_value = dva_lab::DEFAULT_PREFIX)]
        prefix: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Print each unit's rates (packets/s, bytes/s, drops/s) every second until Ctrl-C.
        #[arg(short = 'w', long)]
        watch: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Print a unit's log (every unit's without UNIT), as `kubectl logs`.
    Logs {
        name: String,
        /// The unit id (see `dva units NAME`).
        unit: Option<u32>,
        /// Keep printing what the units append, until Ctrl-C.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The lab the appliance runs in (default: the lab `dva-`, else this machine).
        #[arg(long, default_value = dva_lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Build the lab, run the edge firewall in it, drive real traffic through it and print what happened.
    Demo {
        #[arg(long, default_value = "dva-demo-")]
        prefix: String,
        /// Seconds of live traffic during the scaling (at least 12).
        #[arg(long, default_value_t = 20)]
        secs: u32,
    },
    /// Benchmarks in the lab.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Wait until an appliance is ready (every unit up, its config ACKed everywhere).
    Wait {
        name: String,
        /// The condition (only `ready` for now, as `kubectl wait --for`).
        #[arg(long = "for", value_enum, default_value_t = WaitFor::Ready)]
        condition: WaitFor,
        /// Give up after this long (e.g. 60s, 2m).
        #[arg(long, default_value = "60s")]
        timeout: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `dva completion bash > /etc/bash_completion.d/dva`.
    Completion { shell: clap_complete::Shell },
    /// A compute unit process (started by `dva run` or the management tool, not by hand).
    #[command(hide = true)]
    Unit {
        #[arg(long, value_enum)]
        role: UnitRole,
        /// Unit id within its appliance.
        #[arg(long)]
        id: u32,
        /// Where managers may listen, `tcp://ADDR:PORT[,tcp://ADDR:PORT...]` (other roles
        /// connect to the one that leads).
        #[arg(long, default_value = "")]
        manager: String,
        /// The manager's channel address, `tcp://ADDR:PORT` (managers only).
        #[arg(long)]
        listen: Option<String>,
        /// The unit's certificate (PEM), issued by the installation's CA.
        #[arg(long)]
        tls_cert: PathBuf,
        /// The unit's private key (PEM).
        #[arg(long)]
        tls_key: PathBuf,
        /// The installation's CA certificate (PEM): the only issuer the unit trusts.
        #[arg(long)]
        tls_ca: PathBuf,
        /// The unit's control socket (stats, metrics, readiness).
        #[arg(long)]
        control: PathBuf,
        /// The network namespace to run in (a lab host); default: the current one.
        #[arg(long)]
        netns: Option<String>,
        /// Exit when the process that started it exits (`dva run`'s units).
        #[arg(long)]
        die_with_parent: bool,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Create the lab (idempotent).
    Up {
        #[arg(long, default_value_t = 3)]
        servers: usize,
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// Dispatcher hosts; with more than one, upstream routers spread flows over them (ECMP).
        #[arg(long, default_value_t = 1)]
        dispatchers: usize,
        #[arg(long, default_value = dva_lab::DEFAULT_PREFIX)]
        prefix: String,
        /// Leave TSO/GSO/GRO and TX checksumming on (a Linux host's defaults): TCP crosses
        /// the lab as 64 KB super-packets. Use with a spec's `runtime: { driver: af_packet }`.
        #[arg(long)]
        offloads: bool,
        /// Receive and transmit queues on the dispatchers' appliance-facing veths (out0, in0),
        /// flows spread over them by hash as a NIC's RSS spreads them: with a spec's
        /// `runtime: { driver: af_xdp, dispatcher_threads: N }`, each lane takes a queue. At
        /// most the machine's CPUs.
        #[arg(long, default_value_t = 1)]
        queues: u32,
        /// Make the appliance's hosts machines: a control host {P}ctl (198.19.0.10) runs
        /// `dva serve`, every dispatcher and data-plane host runs `dva agent`, each with its own
        /// /run/dva, /var/lib/dva and /etc/dva (tmpfs in a mount namespace of its own). Returns
        /// once every host is ready; logs and the client file in /run/dva-lab/{P}/.
        #[arg(long)]
        machines: bool,
        /// With --machines: the control host also runs a 3-member etcd cluster (plain HTTP on
        /// its loopback) and a second `dva serve` replica, both replicas storing in etcd.
        #[arg(long, requires = "machines")]
        etcd: bool,
    },
    /// Remove the lab and everything running in it (idempotent).
    Down {
        #[arg(long, default_value = dva_lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Print the lab's namespaces, interfaces and addresses, which hosts are cut, and how to
    /// reach its machines.
    Show {
        #[arg(long, default_value = dva_lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Partition a host: every link it has goes down at the fabric (its processes run on,
    /// hearing nothing).
    Cut {
        /// A host as `dva lab show` names it, with or without the prefix: host1, disp1, ctl,
        /// client, server2...
        host: String,
        #[arg(long, default_value = dva_lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Undo `dva lab cut HOST`: its links come back up.
    Heal {
        /// A host as `dva lab show` names it, with or without the prefix.
        host: String,
        #[arg(long, default_value = dva_lab::DEFAULT_PREFIX)]
        prefix: String,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// iperf3 TCP throughput through the kernel's forwarding vs through dva, same lab, same run.
    Forwarding {
        #[arg(long, default_value = "dva-bench-")]
        prefix: String,
        #[arg(long, default_value_t = 10)]
        secs: u32,
        #[arg(long, default_value_t = 1)]
        streams: u32,
    },
    /// Scale 1 -> 4 -> 1 by hand and by policy under long-lived TCP, short HTTP and UDP streams;
    /// report broken flows, errors, losses, added latency and scale-in times.
    Elasticity {
        #[arg(long, default_value = "dva-bench-")]
        prefix: String,
        /// Scale-out/in cycles by hand.
        #[arg(long, default_value_t = 2)]
        cycles: u32,
        /// Write an SVG plot of data planes and packet rate over time.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// The same workloads through dva (1 and 2 data planes), the kernel with an equivalent
    /// nftables ruleset, the kernel as a load balancer and HAProxy: one table, ratios to the kernel.
    Compare {
        #[arg(long, default_value = "dva-bench-")]
        prefix: String,
        /// Seconds per measurement (30 measurements).
        #[arg(long, default_value_t = 10)]
        secs: u32,
        /// Also print the table as Markdown.
        #[arg(long)]
        markdown: bool,
        /// Also draw the ratios to the kernel as bars, into this SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// The appliance's interface driver (the spec's `runtime.driver`: af_xdp, af_packet or
        /// auto), except in the rows that compare drivers.
        #[arg(long, value_parser = runtime_value::<dva_proto::spec::DriverSpec>, default_value = "auto")]
        driver: dva_proto::spec::DriverSpec,
        /// The backplane between units (the spec's `runtime.backplane`: auto, shm or udp).
        #[arg(long, value_parser = runtime_value::<dva_proto::spec::BackplaneSpec>, default_value = "auto")]
        backplane: dva_proto::spec::BackplaneSpec,
    },
    /// Probe latency and new legitimate connections during a SYN flood and a unique-UDP-tuple
    /// flood, through dva (2 data planes) and through the kernel with an equivalent nftables
    /// ruleset: one table.
    Flood(bench_flood::Options),
    /// kill -9 random units (data plane, dispatcher, leading manager) under traffic; report
    /// broken flows, losses and recovery time per kill.
    Chaos {
        #[arg(long, default_value = "dva-bench-")]
        prefix: String,
        #[arg(long, default_value_t = 6)]
        kills: u32,
        /// Seconds between kills.
        #[arg(long, default_value_t = 5)]
        every: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Kill only units of this role.
        #[arg(long, value_enum)]
        only: Option<UnitRole>,
        /// Also draw the kills and their recovery times along the run, into this SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

/// Which management server to talk to (default: the client file `dva serve` writes).
#[derive(clap::Args)]
struct TargetArgs {
    /// e.g. http://127.0.0.1:7080 (env DVA_SERVER).
    #[arg(long, global = true)]
    server: Option<String>,
    /// API token (env DVA_TOKEN).
    #[arg(long, global = true)]
    token: Option<String>,
    /// The CA certificate (PEM) an https server's certificate must chain to (env DVA_CA_FILE;
    /// default: the client file's, which `dva serve --tls-auto` writes).
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
}

impl TargetArgs {
    fn target(self) -> ctl::Target {
        ctl::Target {
            server: self.server,
            token: self.token,
            ca: self.ca,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    /// The table with more columns.
    Wide,
    Json,
    Yaml,
}

impl Output {
    fn format(self) -> ctl::Format {
        match self {
            Output::Table => ctl::Format::Table,
            Output::Wide => ctl::Format::Wide,
            Output::Json => ctl::Format::Json,
            Output::Yaml => ctl::Format::Yaml,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum WaitFor {
    Ready,
}

#[derive(Clone, Copy, ValueEnum)]
enum UnitRole {
    Manager,
    Dispatcher,
    Dataplane,
}

/// `--label k=v`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

/// `--driver af_packet`, `--backplane udp`: a value of the spec's `runtime`, spelled as in a spec.
fn runtime_value<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|e| e.to_string())
}

/// `--host-lost-after 10s`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    dva_proto::spec::parse_duration_ms(s).map(std::time::Duration::from_millis)
}

fn main() -> ExitCode {
    // Everything dva creates sets its mode explicitly; this catches what does not (files written
    // by subcommands, tools it starts) so nothing of ours is readable by other local users.
    dva_io::local::restrict_umask();
    let cli = Cli::parse();
    let identity = match &cli.cmd {
        Cmd::Unit {
            role, id, control, ..
        } => Some(log::Identity {
            // Units' control sockets live in their appliance's directory.
            appliance: control
                .parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned()),
            unit: *id,
            role: match role {
                UnitRole::Manager => "manager",
                UnitRole::Dispatcher => "dispatcher",
                UnitRole::Dataplane => "dataplane",
            },
        }),
        _ => None,
    };
    log::init(log::format_from(cli.log_format), identity);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dva: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The lab with this prefix, or an error saying how to make one.
fn existing_lab(prefix: &str) -> anyhow::Result<dva_lab::Lab> {
    match dva_lab::Lab::discover(prefix)? {
        Some(lab) => Ok(lab),
        None => anyhow::bail!("no lab with prefix {prefix:?}; create one with `dva lab up`"),
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Lab { cmd } => match cmd {
            LabCmd::Up {
                servers,
                hosts,
                dispatchers,
                prefix,
                offloads,
                queues,
                machines,
                etcd,
            } => {
                let lab = dva_lab::Lab::up(&dva_lab::LabSpec {
                    prefix,
                    servers,
                    hosts,
                    dispatchers,
                    control: machines,
                })?;
                if offloads {
                    lab.set_offloads(true)?;
                }
                if queues > 1 {
                    lab.set_queues(queues)?;
                }
                print!("{}", lab.describe());
                if machines {
                    let dva = std::env::current_exe()
                        .context("finding this dva binary, which the lab's machines run")?;
                    let m = dva_lab::machines::Machines::up(&lab, &dva, etcd)?;
                    print!("{}", m.usage());
                }
                Ok(())
            }
            LabCmd::Down { prefix } => {
                dva_lab::Lab::down(&prefix)?;
                println!("lab {prefix} removed");
                Ok(())
            }
            LabCmd::Show { prefix } => {
                let lab = existing_lab(&prefix)?;
                print!("{}", lab.describe());
                let cut = lab.cut_hosts()?;
                if !cut.is_empty() {
                    println!(
                        "cut: {} (every link down at the fabric; `dva lab heal HOST` brings them back)",
                        cut.join(", ")
                    );
                }
                if lab.control {
                    let dva = std::env::current_exe()
                        .context("finding this dva binary, to ask the lab's machines")?;
                    let m = dva_lab::machines::Machines::new(&lab, &dva)?;
                    if m.started() {
                        print!("{}", m.usage());
                        match m.hosts() {
                            Ok(hosts) => {
                                let hosts: Vec<String> =
                                    hosts.iter().map(|(n, s)| format!("{n} {s}")).collect();
                                println!("hosts: {}", hosts.join(", "));
                            }
                            Err(e) => println!("hosts: the management tool did not answer: {e}"),
                        }
                    } else {
                        println!("machines: not started (`dva lab up --machines` starts them)");
                    }
                }
                Ok(())
            }
            LabCmd::Cut { host, prefix } => {
                let lab = existing_lab(&prefix)?;
                let ns = lab.host_named(&host)?;
                lab.set_cut(&ns, true)?;
                println!("{ns} cut: its links are down at {} (heal: dva lab heal {host} --prefix {prefix})", lab.fabric_ns());
                Ok(())
            }
            LabCmd::Heal { host, prefix } => {
                let lab = existing_lab(&prefix)?;
                let ns = lab.host_named(&host)?;
                lab.set_cut(&ns, false)?;
                println!("{ns} healed: its links are up");
                Ok(())
            }
        },
        Cmd::Run {
            file,
            dataplanes,
            prefix,
            local,
        } => run::run(&run::RunOptions {
            file,
            dataplanes,
            place: run::Place::resolve(prefix, local)?,
        }),
        Cmd::Demo { prefix, secs } => demo::demo(&prefix, secs),
        Cmd::Serve {
            state,
            store,
            listen,
            advertise,
            lab,
            local,
            no_client_config,
            tls_cert,
            tls_key,
            tls_auto,
            host_lost_after,
            etcd_cafile,
            etcd_certfile,
            etcd_keyfile,
        } => ctl::serve(&ctl::ServeOptions {
            host_lost_after,
            etcd_tls: etcd_cafile.map(|ca| dva_mgmt::store::EtcdTls {
                ca,
                // clap allows neither file without the other.
                identity: etcd_certfile.zip(etcd_keyfile),
            }),
            store: store.unwrap_or_else(|| dva_mgmt::store::StoreConfig::File(state.clone())),
            state,
            listen,
            advertise,
            place: run::Place::resolve(lab, local)?,
            write_client: !no_client_config,
            tls: match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => ctl::ServeTls::Files { cert, key },
                _ if tls_auto => ctl::ServeTls::Auto,
                // clap allows neither file without the other.
                _ => ctl::ServeTls::Off,
            },
        }),
        Cmd::Apply {
            file,
            dry_run,
            target,
        } => ctl::apply(&target.target(), &file, dry_run.is_some()),
        Cmd::Diff { file, target } => {
            if ctl::diff(&target.target(), &file)? {
                // kubectl's convention: differences are exit status 1 (not an error message).
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Describe { name, target } => ctl::describe(&target.target(), &name),
        Cmd::Wait {
            name,
            condition: WaitFor::Ready,
            timeout,
            target,
        } => {
            let ms = dva_proto::spec::parse_duration_ms(&timeout)
                .map_err(|e| anyhow::anyhow!("--timeout {timeout:?}: {e}"))?;
            ctl::wait_ready(
                &target.target(),
                &name,
                std::time::Duration::from_millis(ms),
            )
        }
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "dva", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Agent {
            server,
            join_token,
            ca,
            name,
            listen,
            backplane,
            labels,
            state,
            run_dir,
        } => ctl::agent(&dva_mgmt::agent::AgentOptions {
            server,
            join_token,
            server_ca: ca,
            name,
            listen,
            backplane,
            labels: labels.into_iter().collect(),
            state_dir: state,
            run_dir,
            exe: std::env::current_exe()?,
        }),
        Cmd::JoinToken { target } => ctl::join_token(&target.target()),
        Cmd::Get {
            name: Some(name),
            output,
            watch: false,
            target,
        } if name == "hosts" => ctl::get_hosts(&target.target(), output.format()),
        Cmd::Get {
            name,
            output,
            watch: false,
            target,
        } => ctl::get(&target.target(), name.as_deref(), output.format()),
        Cmd::Get {
            name,
            output,
            watch: true,
            target,
        } => ctl::get_watch(&target.target(), name.as_deref(), output.format()),
        Cmd::Scale {
            name,
            dataplanes,
            drain_deadline,
            target,
        } => ctl::scale(&target.target(), &name, dataplanes, drain_deadline),
        Cmd::Delete { name, target } => ctl::delete(&target.target(), &name),
        Cmd::Events {
            name,
            output,
            watch,
            target,
        } => ctl::events(&target.target(), &name, output.format(), watch),
        Cmd::Units {
            name,
            output,
            target,
        } => ctl::units(&target.target(), &name, output.format()),
        Cmd::Flows {
            name,
            src,
            dst,
            port,
            proto,
            state,
            unit,
            replicas,
            limit,
            output,
            target,
        } => {
            use dva_unit::inspect::percent_encode as enc;
            let mut q = vec![format!("limit={limit}")];
            let text = [
                ("src", src),
                ("dst", dst),
                ("proto", proto),
                ("state", state),
            ];
            for (k, v) in text {
                if let Some(v) = v {
                    q.push(format!("{k}={}", enc(&v)));
                }
            }
            if let Some(p) = port {
                q.push(format!("port={p}"));
            }
            if let Some(u) = unit {
                q.push(format!("unit={u}"));
            }
            if replicas {
                q.push("replicas=true".into());
            }
            ctl::flows(&target.target(), &name, &q.join("&"), output.format())
        }
        Cmd::Config {
            name,
            unit,
            output,
            target,
        } => ctl::config(&target.target(), &name, unit, output.format()),
        Cmd::Capture {
            name,
            interface,
            unit,
            count,
            duration,
            snaplen,
            write,
            filter,
            target,
        } => {
            use dva_unit::inspect::percent_encode as enc;
            let ms = dva_proto::spec::parse_duration_ms(&duration)
                .map_err(|e| anyhow::anyhow!("--duration {duration:?}: {e}"))?;
            let mut q = vec![format!("count={count}"), format!("duration={ms}ms")];
            if let Some(i) = interface {
                q.push(format!("interface={}", enc(&i)));
            }
            if let Some(u) = unit {
                q.push(format!("unit={u}"));
            }
            if let Some(s) = snaplen {
                q.push(format!("snaplen={s}"));
            }
            q.extend(ctl::capture_filter(&filter)?);
            ctl::capture(
                &target.target(),
                &name,
                &q.join("&"),
                std::time::Duration::from_millis(ms),
                &write,
            )
        }
        Cmd::Monitor {
            name,
            kind,
            unit,
            rate,
            host,
            port,
            proto,
            duration,
            output,
            target,
        } => {
            use dva_unit::inspect::percent_encode as enc;
            let ms = match &duration {
                Some(d) => dva_proto::spec::parse_duration_ms(d)
                    .map_err(|e| anyhow::anyhow!("--duration {d:?}: {e}"))?,
                None => dva_unit::monitor::MAX_SECS * 1000,
            };
            let mut q = vec![
                format!("type={}", enc(&kind)),
                format!("rate={rate}"),
                format!("duration={ms}ms"),
            ];
            if let Some(u) = unit {
                q.push(format!("unit={u}"));
            }
            if let Some(h) = host {
                q.push(format!("host={}", enc(&h)));
            }
            if let Some(p) = port {
                q.push(format!("port={p}"));
            }
            if let Some(p) = proto {
                q.push(format!("proto={}", enc(&p)));
            }
            ctl::monitor(
                &target.target(),
                &name,
                &q.join("&"),
                std::time::Duration::from_millis(ms),
                output == Output::Json,
            )
        }
        Cmd::Bench {
            cmd:
                BenchCmd::Forwarding {
                    prefix,
                    secs,
                    streams,
                },
        } => demo::bench_forwarding(&prefix, secs, streams),
        Cmd::Bench {
            cmd:
                BenchCmd::Elasticity {
                    prefix,
                    cycles,
                    plot,
                },
        } => bench_elasticity::run(&bench_elasticity::Options {
            prefix,
            cycles,
            plot,
        }),
        Cmd::Bench {
            cmd:
                BenchCmd::Compare {
                    prefix,
                    secs,
                    markdown,
                    svg,
                    driver,
                    backplane,
                },
        } => bench_compare::run(&bench_compare::Options {
            prefix,
            secs,
            markdown,
            svg,
            runtime: dva_proto::spec::RuntimeSpec {
                driver,
                backplane,
                ..Default::default()
            },
        }),
        Cmd::Bench {
            cmd: BenchCmd::Flood(opts),
        } => bench_flood::run(&opts),
        Cmd::Bench {
            cmd:
                BenchCmd::Chaos {
                    prefix,
                    kills,
                    every,
                    seed,
                    only,
                    svg,
                },
        } => bench_chaos::run(&bench_chaos::Options {
            prefix,
            kills,
            every,
            seed,
            svg,
            only: only.map(|r| match r {
                UnitRole::Manager => dva_mgmt::UnitRole::Manager,
                UnitRole::Dispatcher => dva_mgmt::UnitRole::Dispatcher,
                UnitRole::Dataplane => dva_mgmt::UnitRole::Dataplane,
            }),
        }),
        Cmd::Stats {
            name,
            prefix,
            output,
            watch,
            target,
        } => {
            // Through the management API when one is configured (the units may be on other
            // machines); else the units `dva run` started on this machine.
            let t = target.target();
            let json = output == Output::Json;
            if ctl::has_server(&t) {
                // A client file left by an earlier `dva serve` must not hide an appliance
                // `dva run` runs here now: the local units answer when the API cannot.
                ctl::stats(&t, &name, json, watch).or_else(|e| {
                    if watch {
                        return Err(e);
                    }
                    run::stats(&name, &prefix, json).map_err(|_| e)
                })
            } else if watch {
                anyhow::bail!("--watch needs the management API (dva serve): none is configured")
            } else {
                run::stats(&name, &prefix, output == Output::Json)
            }
        }
        Cmd::Logs {
            name,
            unit,
            follow,
            prefix,
        } => run::logs(&name, unit, &prefix, follow),
        Cmd::Unit {
            role,
            id,
            manager,
            listen,
            tls_cert,
            tls_key,
            tls_ca,
            control,
            netns,
            die_with_parent,
        } => {
            let role = match role {
                UnitRole::Manager => dva_unit::Role::Manager,
                UnitRole::Dispatcher => dva_unit::Role::Dispatcher,
                UnitRole::Dataplane => dva_unit::Role::Dataplane,
            };
            dva_unit::run_unit(&dva_unit::UnitArgs {
                role,
                id,
                manager,
                listen,
                tls: dva_unit::tls::TlsFiles {
                    cert: tls_cert,
                    key: tls_key,
                    ca: tls_ca,
                },
                control,
                netns,
                die_with_parent,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("dva").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// `dva serve`'s TLS flags: a certificate and its key together, or `--tls-auto`, never both.
    #[test]
    fn serve_tls_flags_go_together() {
        let tls = |args: &[&str]| match parse(args).map(|c| c.cmd) {
            Ok(Cmd::Serve {
                tls_cert,
                tls_key,
                tls_auto,
                ..
            }) => Ok((tls_cert.is_some(), tls_key.is_some(), tls_auto)),
            Ok(_) => panic!("not serve"),
            Err(e) => Err(e.kind()),
        };
        assert_eq!(tls(&["serve"]), Ok((false, false, false)));
        assert_eq!(
            tls(&["serve", "--tls-cert", "c.pem", "--tls-key", "k.pem"]),
            Ok((true, true, false))
        );
        assert_eq!(tls(&["serve", "--tls-auto"]), Ok((false, false, true)));
        let missing = Err(clap::error::ErrorKind::MissingRequiredArgument);
        assert_eq!(tls(&["serve", "--tls-cert", "c.pem"]), missing);
        assert_eq!(tls(&["serve", "--tls-key", "k.pem"]), missing);
        assert_eq!(
            tls(&["serve", "--tls-auto", "--tls-cert", "c", "--tls-key", "k"]),
            Err(clap::error::ErrorKind::ArgumentConflict)
        );
    }

    /// `--ca` goes with `--server` and `--token`, wherever they are taken.
    #[test]
    fn the_ca_is_a_target_flag() {
        for args in [
            &["get", "--ca", "ca.pem", "--server", "https://h:1"][..],
            &["get", "edge-fw", "--ca", "ca.pem"][..],
        ] {
            match parse(args) {
                Ok(Cli {
                    cmd: Cmd::Get { target, .. },
                    ..
                }) => assert_eq!(target.ca, Some(PathBuf::from("ca.pem")), "{args:?}"),
                Ok(_) => panic!("not get"),
                Err(e) => panic!("{args:?}: {e}"),
            }
        }
    }
}
