//! `dva`: the one binary. Lab management, running an appliance, the compute-unit process itself,
//! and the tools to look inside a running appliance.

mod bench_chaos;
mod bench_compare;
mod bench_elasticity;
mod ctl;
mod demo;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "dva",
    version,
    about = "A distributed virtual appliance: firewall, NAT and L4 load balancing scaled out over many processes"
)]
struct Cli {
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
        /// Where the store (and the API token) live.
        #[arg(long, default_value = "/var/lib/dva")]
        state: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7080")]
        listen: std::net::SocketAddr,
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
    },
    /// Create or replace appliances from specs ("unchanged" when one already runs that spec).
    Apply {
        /// A spec file (YAML or JSON), a directory of them, or `-` for standard input.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
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
        /// the lab as 64 KB super-packets. Use with DVA_DRIVER=af_packet.
        #[arg(long)]
        offloads: bool,
    },
    /// Remove the lab and everything running in it (idempotent).
    Down {
        #[arg(long, default_value = dva_lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Print the lab's namespaces, interfaces and addresses.
    Show {
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
        /// Seconds per measurement (24 measurements).
        #[arg(long, default_value_t = 10)]
        secs: u32,
        /// Also print the table as Markdown.
        #[arg(long)]
        markdown: bool,
    },
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
}

impl TargetArgs {
    fn target(self) -> ctl::Target {
        ctl::Target {
            server: self.server,
            token: self.token,
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

fn main() -> ExitCode {
    // Everything dva creates sets its mode explicitly; this catches what does not (files written
    // by subcommands, tools it starts) so nothing of ours is readable by other local users.
    dva_io::local::restrict_umask();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dva: error: {e:#}");
            ExitCode::FAILURE
        }
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
            } => {
                let lab = dva_lab::Lab::up(&dva_lab::LabSpec {
                    prefix,
                    servers,
                    hosts,
                    dispatchers,
                })?;
                if offloads {
                    lab.set_offloads(true)?;
                }
                print!("{}", lab.describe());
                Ok(())
            }
            LabCmd::Down { prefix } => {
                dva_lab::Lab::down(&prefix)?;
                println!("lab {prefix} removed");
                Ok(())
            }
            LabCmd::Show { prefix } => match dva_lab::Lab::discover(&prefix)? {
                Some(lab) => {
                    print!("{}", lab.describe());
                    Ok(())
                }
                None => {
                    anyhow::bail!("no lab with prefix {prefix:?}; create one with `dva lab up`")
                }
            },
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
            listen,
            lab,
            local,
            no_client_config,
        } => ctl::serve(
            &state,
            listen,
            &run::Place::resolve(lab, local)?,
            !no_client_config,
        ),
        Cmd::Apply { file, target } => ctl::apply(&target.target(), &file),
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
                },
        } => bench_compare::run(&bench_compare::Options {
            prefix,
            secs,
            markdown,
        }),
        Cmd::Bench {
            cmd:
                BenchCmd::Chaos {
                    prefix,
                    kills,
                    every,
                    seed,
                    only,
                },
        } => bench_chaos::run(&bench_chaos::Options {
            prefix,
            kills,
            every,
            seed,
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
        } => run::stats(&name, &prefix, output == Output::Json),
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
