//! vnic-ping: ICMP/ICMPv6 echo over the vnic-guest stack on vnicd.

use std::{net::IpAddr, process::ExitCode, time::Duration};

use clap::Parser;
use vnic_guest::cli::NetArgs;

#[derive(Debug, Parser)]
#[command(
    name = "vnic-ping",
    about = "Send echo requests through vnicd with the vnic-guest stack"
)]
struct Cli {
    #[command(flatten)]
    net: NetArgs,
    /// Requests to send.
    #[arg(short = 'c', default_value_t = 3)]
    count: u16,
    /// Seconds between requests.
    #[arg(short = 'i', default_value_t = 0.2)]
    interval: f64,
    /// Payload bytes.
    #[arg(short = 's', default_value_t = 56)]
    size: usize,
    /// Seconds to wait for each reply.
    #[arg(short = 'W', default_value_t = 2.0)]
    wait: f64,
    /// Keep the stack up this many seconds afterwards, answering pings.
    #[arg(long, default_value_t = 0.0)]
    linger: f64,
    /// Address to ping.
    target: IpAddr,
}

fn main() -> ExitCode {
    env_logger::init();
    let cli = Cli::parse();
    let stack = match cli.net.start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vnic-ping: {e}");
            return ExitCode::from(2);
        }
    };
    let ident = (std::process::id() & 0xffff) as u16;
    let mut got = 0u32;
    let mut rtts = Vec::new();
    println!("PING {} {} data bytes", cli.target, cli.size);
    for seq in 1..=cli.count {
        match stack.ping(
            cli.target,
            ident,
            seq,
            cli.size,
            Duration::from_secs_f64(cli.wait),
        ) {
            Ok(Some(rtt)) => {
                got += 1;
                let ms = rtt.as_secs_f64() * 1000.0;
                rtts.push(ms);
                println!(
                    "{} bytes from {}: icmp_seq={seq} time={ms:.3} ms",
                    cli.size + 8,
                    cli.target
                );
            }
            Ok(None) => println!("no reply for icmp_seq={seq}"),
            Err(e) => {
                eprintln!("vnic-ping: {e}");
                return ExitCode::from(2);
            }
        }
        std::thread::sleep(Duration::from_secs_f64(cli.interval));
    }
    let loss = 100.0 * f64::from(u32::from(cli.count) - got) / f64::from(cli.count.max(1));
    println!(
        "{} packets transmitted, {got} received, {loss:.0}% packet loss",
        cli.count
    );
    if let (Some(min), Some(max)) = (
        rtts.iter().copied().reduce(f64::min),
        rtts.iter().copied().reduce(f64::max),
    ) {
        let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
        println!("rtt min/avg/max = {min:.3}/{avg:.3}/{max:.3} ms");
    }
    if cli.linger > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(cli.linger));
        let s = stack.stats();
        println!("echo requests answered: {}", s.echo_replied);
    }
    stack.shutdown();
    if got > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
