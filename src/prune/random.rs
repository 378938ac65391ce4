//! Random masks: the floor every method must clear. Each weight gets a uniform random score (seeded by the
//! weight itself, so that a run is reproducible and every operator draws its own mask) and the lowest scores
//! of each row are dropped; no calibration data, no weight update.

use anyhow::Result;
use faer::Mat;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::mask::{self, Pattern};
use super::{Method, MethodOptions, Observes, OpStats, Pruned, Registered};

pub const METHOD: Registered = Registered { name: "random", build: |_: &MethodOptions| Ok(Box::new(Random)) };

pub struct Random;

impl Method for Random {
    fn observes(&self) -> Observes {
        Observes::Nothing
    }

    fn prune(&self, w: &Mat<f32>, _stats: Option<&OpStats>, pattern: Pattern) -> Result<Pruned> {
        let seed = (0..w.ncols())
            .flat_map(|j| w.col_as_slice(j))
            .fold(0xcbf29ce484222325u64, |h, x| (h ^ x.to_bits() as u64).wrapping_mul(0x100000001b3));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let scores = Mat::from_fn(w.nrows(), w.ncols(), |_, _| rng.random::<f32>());
        let out = mask::zeroed(w, &mask::select(&scores, pattern, true));
        Ok(Pruned::per_row(out))
    }
}
