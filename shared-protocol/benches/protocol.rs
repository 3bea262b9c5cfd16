//! Benchmarks of vnic-protocol's hot paths, each beside a baseline run in
//! the same process: the byte-pair checksum of RFC 1071, the bit-at-a-time
//! Toeplitz hash, and plain memcpy of the same bytes for segmentation, GRO
//! and reassembly (the least any of them could cost).
//!
//! `cargo bench -p vnic-protocol --bench protocol`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vnic_protocol::{
    checksum,
    frag::{Outcome, Reassembler},
    offload::{Gro, Segmenter},
    rss::{toeplitz_bitwise, Toeplitz, DEFAULT_KEY},
    wire::{
        build::{self, data_segment, tcp_frame, Flow, IpFields},
        parse_frame,
        tcp::Flags,
    },
};

fn bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 131 + 17) as u8).collect()
}

/// RFC 1071's definition, 16 bits at a time.
fn pairwise_sum(data: &[u8]) -> u16 {
    let mut acc: u32 = 0;
    let mut it = data.chunks_exact(2);
    for w in &mut it {
        acc += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = it.remainder() {
        acc += u32::from(*b) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn bench_checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("checksum");
    for size in [64usize, 1500, 65536] {
        let data = bytes(size);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("word-at-a-time", size), &data, |b, d| {
            b.iter(|| checksum::sum(black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("baseline-16bit", size), &data, |b, d| {
            b.iter(|| pairwise_sum(black_box(d)))
        });
    }
    g.finish();
}

fn bench_toeplitz(c: &mut Criterion) {
    let mut g = c.benchmark_group("toeplitz");
    let t = Toeplitz::new(&DEFAULT_KEY).unwrap();
    for (name, len) in [("ipv4-tcp", 12usize), ("ipv6-tcp", 36)] {
        let input = bytes(len);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("table", name), &input, |b, i| {
            b.iter(|| t.hash(black_box(i)))
        });
        g.bench_with_input(
            BenchmarkId::new("baseline-bitwise", name),
            &input,
            |b, i| b.iter(|| toeplitz_bitwise(&DEFAULT_KEY, black_box(i))),
        );
    }
    g.finish();
}

fn super_frame() -> Vec<u8> {
    let payload = bytes(65536 - 14 - 20 - 32);
    tcp_frame(
        &Flow::v4(),
        data_segment(1, 1, Flags::ACK | Flags::PSH),
        &IpFields::default(),
        &payload,
    )
    .unwrap()
}

fn segments(frame: &[u8]) -> Vec<Vec<u8>> {
    let info = parse_frame(frame).unwrap();
    let mut out = Vec::new();
    Segmenter::new()
        .segment_parsed(frame, &info, 1448, &mut |h, p| {
            let mut f = h.to_vec();
            f.extend_from_slice(p);
            out.push(f);
        })
        .unwrap();
    out
}

fn bench_segmentation(c: &mut Criterion) {
    let mut g = c.benchmark_group("tso-64k-1448");
    let frame = super_frame();
    let info = parse_frame(&frame).unwrap();
    g.throughput(Throughput::Bytes(frame.len() as u64));
    let mut seg = Segmenter::new();
    // What a TAP writev of each segment would need: headers rewritten,
    // payload referenced in place.
    g.bench_function("segment", |b| {
        b.iter(|| {
            let mut n = 0usize;
            seg.segment_parsed(black_box(&frame), &info, 1448, &mut |h, p| {
                n += h.len() + p.len();
            })
            .unwrap();
            n
        })
    });
    // Segments copied out into one contiguous buffer each.
    let mut out = vec![0u8; 2048];
    g.bench_function("segment-and-copy", |b| {
        b.iter(|| {
            seg.segment_parsed(black_box(&frame), &info, 1448, &mut |h, p| {
                out[..h.len()].copy_from_slice(h);
                out[h.len()..h.len() + p.len()].copy_from_slice(p);
            })
            .unwrap();
        })
    });
    let hdr = 66;
    g.bench_function("baseline-memcpy", |b| {
        b.iter(|| {
            for chunk in black_box(&frame[hdr..]).chunks(1448) {
                out[..hdr].copy_from_slice(&frame[..hdr]);
                out[hdr..hdr + chunk.len()].copy_from_slice(chunk);
            }
            black_box(&out);
        })
    });
    g.finish();
}

fn bench_gro(c: &mut Criterion) {
    let mut g = c.benchmark_group("gro-64k-1448");
    let segs = segments(&super_frame());
    let total: usize = segs.iter().map(Vec::len).sum();
    g.throughput(Throughput::Bytes(total as u64));
    let mut gro = Gro::default();
    g.bench_function("coalesce", |b| {
        b.iter(|| {
            let mut n = 0;
            for s in &segs {
                gro.receive(black_box(s), &mut |p| n += p.frame.len());
            }
            gro.flush(&mut |p| n += p.frame.len());
            n
        })
    });
    let mut out = vec![0u8; 70000];
    g.bench_function("baseline-memcpy", |b| {
        b.iter(|| {
            let mut at = 0;
            for s in black_box(&segs) {
                let p = &s[66..];
                out[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            black_box(&out);
        })
    });
    g.finish();
}

fn fragments() -> Vec<Vec<u8>> {
    let payload = bytes(65000);
    let mut out = Vec::new();
    for (k, chunk) in payload.chunks(1480).enumerate() {
        let more = (k + 1) * 1480 < payload.len();
        out.push(build::ipv4_fragment(7, k * 1480, more, chunk).unwrap());
    }
    out
}

fn bench_reassembly(c: &mut Criterion) {
    let mut g = c.benchmark_group("reassembly-64k-1480");
    let frags = fragments();
    g.throughput(Throughput::Elements(frags.len() as u64));
    let mut r = Reassembler::default();
    g.bench_function("reassemble", |b| {
        b.iter(|| {
            let mut done = 0;
            for f in &frags {
                if let Ok(Outcome::Complete(p)) = r.push(0, black_box(f)) {
                    done += p.len();
                }
            }
            assert!(done > 0);
            done
        })
    });
    let mut out = vec![0u8; 70000];
    g.bench_function("baseline-memcpy", |b| {
        b.iter(|| {
            for (k, f) in black_box(&frags).iter().enumerate() {
                let p = &f[20..];
                out[k * 1480..k * 1480 + p.len()].copy_from_slice(p);
            }
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_checksum,
    bench_toeplitz,
    bench_segmentation,
    bench_gro,
    bench_reassembly
);
criterion_main!(benches);
