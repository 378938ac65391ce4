//! Property test of the safetensors and GGUF header parsers on corrupted files: seeded random mutations of
//! valid fixtures (flipped bytes, counts and offsets overwritten with random or huge values, truncation,
//! random bytes behind a valid magic). Every file must give `Ok` or an error, never a panic, and no single
//! allocation while parsing may exceed a constant times the file's size (a lying count must not make the
//! parser reserve what the file cannot hold). `FUZZ_ITERS` sets the cases per format (default 3000).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use fistaprune::model::gguf::GgufFile;
use fistaprune::model::safetensors::SafetensorsStore;
use rand::{RngExt, SeedableRng};

/// The system allocator, recording the largest single request while `WATCH` is set.
struct Watch;
static WATCH: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new, Ordering::Relaxed);
        }
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

fn mutate(rng: &mut rand_chacha::ChaCha8Rng, seed: &[u8], header: usize) -> Vec<u8> {
    let mut b = seed.to_vec();
    match rng.random_range(0..5) {
        // A few flipped bytes in the header.
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..header.min(b.len()));
                b[i] ^= 1 << rng.random_range(0..8);
            }
        }
        // A count, length or offset overwritten: random, huge, or just past the end.
        1 => {
            let i = rng.random_range(0..header.min(b.len()).saturating_sub(8).max(1));
            let v: u64 = match rng.random_range(0..3) {
                0 => rng.random(),
                1 => u64::MAX - rng.random_range(0..16),
                _ => seed.len() as u64 + rng.random_range(0..64),
            };
            let end = (i + 8).min(b.len());
            b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
        }
        // Truncated anywhere.
        2 => b.truncate(rng.random_range(0..b.len())),
        // Random bytes behind the first eight.
        3 => {
            let n = rng.random_range(8..4096);
            b.truncate(8.min(b.len()));
            b.extend((0..n).map(|_| rng.random::<u8>()));
        }
        // Bytes of the header's text replaced (the JSON of safetensors, the strings of GGUF).
        _ => {
            let i = rng.random_range(0..header.min(b.len()));
            let n = rng.random_range(1..32).min(b.len() - i);
            for x in &mut b[i..i + n] {
                *x = b"{}[]\":,0123456789e-"[rng.random_range(0..19)];
            }
        }
    }
    b
}

fn fuzz(name: &str, seed: &[u8], header: usize, open: &dyn Fn(&std::path::Path) -> anyhow::Result<()>) {
    let iters: usize = std::env::var("FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let d = tmpdir(&format!("fuzz-{name}"));
    let path = d.join(name);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (mut ok, mut err, mut most) = (0, 0, 0f64);
    for case in 0..iters {
        let bytes = mutate(&mut rng, seed, header);
        std::fs::write(&path, &bytes).unwrap();
        LARGEST.store(0, Ordering::Relaxed);
        WATCH.store(true, Ordering::Relaxed);
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| open(&path)));
        WATCH.store(false, Ordering::Relaxed);
        let largest = LARGEST.load(Ordering::Relaxed);
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => panic!("{name} case {case}: the parser panicked ({} bytes)", bytes.len()),
        }
        // One metadata value per byte at most, each an enum of 32 bytes; plus fixed overheads.
        let bound = 64 * bytes.len() + (1 << 20);
        most = most.max(largest as f64 / bytes.len().max(1) as f64);
        assert!(largest <= bound, "{name} case {case}: a {largest}-byte allocation for a {}-byte file", bytes.len());
    }
    eprintln!("{name}: {iters} cases, {ok} opened, {err} refused; largest allocation {most:.2}× the file");
    assert!(err > iters / 2, "{name}: most mutations should be refused ({err} of {iters})");
}

#[test]
fn corrupted_headers_never_panic_or_overallocate() {
    let st = std::fs::read(fixture("llama").join("model.safetensors")).unwrap();
    let st_header = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    fuzz("model.safetensors", &st, st_header, &|p| SafetensorsStore::open_files(&[p.to_path_buf()]).map(|_| ()));
    let gg = std::fs::read(fixture("llama_gguf").join("tiny.gguf")).unwrap();
    // The GGUF header (metadata and tensor infos) is what precedes the first tensor's data; 16 KiB covers it.
    fuzz("tiny.gguf", &gg, 16 << 10, &|p| GgufFile::open(p).map(|_| ()));
}
