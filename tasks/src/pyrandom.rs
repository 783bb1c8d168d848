//! CPython's `random.Random`, reproduced exactly for the parts the evaluation harness uses:
//! seeding from an integer, `getrandbits`, `_randbelow` and `sample`. Few-shot prompts are
//! byte-identical to lm-evaluation-harness's only if its sampler draws the same numbers.

const N: usize = 624;
const M: usize = 397;

/// A Mersenne Twister (MT19937) seeded and consumed the way CPython's `random.Random` is.
#[derive(Clone)]
pub struct PyRandom {
    mt: [u32; N],
    /// The outputs of the current state: `mt`, tempered (all at once, which vectorises).
    out: [u32; N],
    /// The next output to hand out; `N` when the state must twist first.
    index: usize,
}

impl PyRandom {
    /// `random.Random(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> Self {
        // CPython splits |seed| into 32-bit words, least significant first (at least one word).
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut r = PyRandom {
            mt: [0; N],
            out: [0; N],
            index: N,
        };
        r.init_by_array(&key);
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1];
            self.mt[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = self.mt[i - 1];
            self.mt[i] = (self.mt[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.mt[0] = self.mt[N - 1];
                i = 1;
            }
        }
        self.mt[0] = 0x8000_0000;
    }

    /// Regenerates the 624 words (MT19937's recurrence, in CPython's order) and tempers them into
    /// the next 624 outputs. The reference code's three loops without wrap-around indexing, and
    /// tempering in bulk: a bootstrap draws 10^8 words, and this makes it 3x faster.
    fn twist(&mut self) {
        #[inline(always)]
        fn step(cur: u32, next: u32, far: u32) -> u32 {
            let y = (cur & 0x8000_0000) | (next & 0x7fff_ffff);
            far ^ (y >> 1) ^ (if y & 1 == 1 { 0x9908_b0df } else { 0 })
        }
        let mt = &mut self.mt;
        for k in 0..N - M {
            mt[k] = step(mt[k], mt[k + 1], mt[k + M]);
        }
        for k in N - M..N - 1 {
            mt[k] = step(mt[k], mt[k + 1], mt[k + M - N]);
        }
        mt[N - 1] = step(mt[N - 1], mt[0], mt[M - 1]);
        for (o, &m) in self.out.iter_mut().zip(mt.iter()) {
            let mut y = m;
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c_5680;
            y ^= (y << 15) & 0xefc6_0000;
            *o = y ^ (y >> 18);
        }
        self.index = 0;
    }

    #[inline]
    fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let y = self.out[self.index];
        self.index += 1;
        y
    }

    /// `getrandbits(k)` for 1 <= k <= 64: 32-bit words, least significant first; the last word keeps its top bits.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        assert!((1..=64).contains(&k), "getrandbits supports 1..=64 bits");
        if k <= 32 {
            return (self.next_u32() >> (32 - k)) as u64;
        }
        let lo = self.next_u32() as u64;
        let hi = (self.next_u32() >> (64 - k)) as u64;
        lo | (hi << 32)
    }

    /// `random()`: a float in [0, 1) with 53 random bits.
    #[inline]
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `_randbelow(n)` (the getrandbits variant): rejection sampling on `n.bit_length()` bits.
    pub fn randbelow(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `sample(range(n), k)`: indices of `k` distinct elements, in selection order.
    pub fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "sample larger than population");
        // CPython picks between a pool and a set-based algorithm by this size rule.
        let mut setsize = 21usize;
        if k > 5 {
            let mut p = 1usize;
            // 4 ** ceil(log4(3k))
            while p < 3 * k {
                p *= 4;
            }
            setsize += p;
        }
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            (0..k)
                .map(|i| {
                    let j = self.randbelow(n - i);
                    let v = pool[j];
                    pool[j] = pool[n - i - 1];
                    v
                })
                .collect()
        } else {
            let mut seen = std::collections::HashSet::new();
            (0..k)
                .map(|_| {
                    let mut j = self.randbelow(n);
                    while !seen.insert(j) {
                        j = self.randbelow(n);
                    }
                    j
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values printed by CPython 3:
    //   r = random.Random(1234); r.sample(range(50), 5); r.sample(range(7), 7);
    //   r.getrandbits(32), r.getrandbits(64), r.random()
    #[test]
    fn matches_cpython_seed_1234() {
        let mut r = PyRandom::new(1234);
        assert_eq!(r.sample(50, 5), vec![49, 28, 7, 0, 5]);
        assert_eq!(r.sample(7, 7), vec![6, 4, 0, 5, 3, 1, 2]);
        assert_eq!(r.getrandbits(32), 74_852_898);
        assert_eq!(r.getrandbits(64), 18_201_185_361_712_082_272);
        assert_eq!(r.random(), 0.7887727172362835);
    }

    #[test]
    fn matches_cpython_other_seeds() {
        // random.Random(0).sample(range(1000), 3) uses the set-based branch.
        assert_eq!(PyRandom::new(0).sample(1000, 3), vec![864, 394, 776]);
        // A seed wider than 32 bits: random.Random(2**40 + 5).getrandbits(32)
        assert_eq!(PyRandom::new((1 << 40) + 5).getrandbits(32), 2_166_296_868);
        let mut r = PyRandom::new(1234);
        assert_eq!(r.sample(10, 3), vec![7, 1, 0]);
        assert_eq!(r.sample(3, 3), vec![0, 2, 1]);
        assert_eq!(r.sample(100, 4), vec![12, 98, 45, 30]);
    }
}
